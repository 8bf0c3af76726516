"""Datasets of the test tasks, read from the JSONL files beside this file (lm_eval's custom_dataset
hook: it calls these with the task's metadata as keyword arguments)."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load_jsonl(name: str) -> dict:
    import datasets

    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def load_colors_mc(**_):
    return load_jsonl("colors_mc.jsonl")


def load_colors_gen(**_):
    return load_jsonl("colors_gen.jsonl")
