"""`mmfm eval lm --model EXPORT --tasks T ... [--include-path DIR] --json PATH`: lm-evaluation-harness
(`lm_eval`, the `eval` extra) on an export's text side, through lm_eval's own `hf` model, which loads
the folder with transformers (config.json, safetensors, tokenizer.json; mmfm export writes all of
them). Nothing mmfm-specific sits between the harness and the model, so the figures are the ones
anyone running lm_eval on the folder gets.

Encoding with special tokens (lm_eval's default for causal models) puts <|bos|> <|begin_text|> in
front of every context, the layout mmfm trains text on; generation tasks decode under the export's
generation_config.json (text ids only, stop at <|eos|> / <|end_text|>), as `mmfm generate` does.
Task names come from lm_eval's registry or from YAML files under --include-path (a folder such as
tests/lm_eval_tasks, whose datasets are local files: nothing is downloaded).
"""
from __future__ import annotations

import json
import os

from mmfm.jsonio import write_json

NEEDED = ("config.json", "tokenizer.json", "tokenizer_config.json")
DENSE_ONLY = "lm_eval's hf model loads Llama-layout exports"


def check_export(folder: str) -> dict:
    """Fail before lm_eval starts if `folder` is not an export transformers can load with its tokenizer;
    returns its config.json."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--model {folder!r}: no such folder")
    for name in NEEDED:
        if not os.path.exists(os.path.join(folder, name)):
            hint = (" (mmfm export writes it when the run's tokenizers, with tokenizers/text, are given: "
                    "--tokenizers DIR)" if name.startswith("tokenizer") else " (make the folder with mmfm export)")
            raise FileNotFoundError(f"--model {folder!r}: no {name}{hint}")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    if config.get("model_type") is None and "auto_map" not in config:
        raise ValueError(f"--model {folder!r}: config.json has neither model_type nor auto_map; {DENSE_ONLY} and "
                         "modality-sparse exports that carry modeling_mmfm.py")
    return config


def run(model: str, tasks: list[str], include_path: str | None = None, out: str | None = None,
        limit: float | None = None, batch_size: int = 1, device: str = "cpu", num_fewshot: int | None = None,
        log_samples: bool = False, seed: int = 0) -> dict:
    """lm_eval.simple_evaluate on the export; returns (and writes to `out`) its results as JSON data."""
    config = check_export(model)
    if not tasks:
        raise ValueError("--tasks: name at least one task")
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"--include-path {include_path!r}: no such folder")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable
    except ImportError as exc:
        raise ImportError("mmfm eval lm needs lm-evaluation-harness: pip install -c constraints.txt -e '.[eval]'") \
            from exc
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or under --include-path {include_path}" if include_path else " (add --include-path DIR for yours)"
        raise ValueError(f"--tasks: unknown task {unknown[0]!r}: not in lm_eval's registry{where}")
    model_args = {"pretrained": os.path.abspath(model), "dtype": "float32"}
    if "auto_map" in config:   # a modality-sparse export: its own modeling_mmfm.py, written by mmfm export
        model_args["trust_remote_code"] = True
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=list(tasks),
        num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit, task_manager=manager,
        log_samples=log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed)
    data = json.loads(json.dumps(results, default=handle_non_serializable))
    data["mmfm"] = {"model": os.path.abspath(model), "tasks": list(tasks), "include_path": include_path}
    if out:
        write_json(out, data)
    return data


def table(data: dict) -> str:
    """task, metric, value (and its stderr) for every numeric figure lm_eval reports."""
    lines = [f"{'task':<28} {'metric':<24} {'value':>10} {'stderr':>10}"]
    for task, figures in data.get("results", {}).items():
        for key, value in figures.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            err = figures.get(f"{metric}_stderr,{filt}")
            err_s = f"{err:.4f}" if isinstance(err, (int, float)) else "-"
            lines.append(f"{task:<28} {metric:<24} {value:>10.4f} {err_s:>10}")
    return "\n".join(lines)
