"""Evaluation of a trained model against the demo corpus (docs/eval.md).

    import mmfm.eval
    records = mmfm.eval.prompts("runs/demo/export", n=50, json="eval.json")   # mmfm eval prompts

`prompts` generates, for every modality, from held-out prompts of the demo corpus and scores
whether each output matches its prompt, with scorers fitted on the corpus' own labels; each figure
comes with its chance level, the scorer's ceiling and the sample count. For training, PromptEval
(runner.py) does the model-free work once and `run(model)` scores an in-memory Transformer.

Modules: labels.py (labels from captions), promptsets.py (which samples are prompts, which fit the
scorers), scorers/ (one per modality), cache.py (fitted scorers on disk), gen.py (the generation
API, in one place), runner.py (PromptEval), commands.py (`mmfm eval prompts`).
"""
from __future__ import annotations

import os

from mmfm.jsonio import write_records

_LAZY = {"Sampling": "mmfm.eval.gen", "ALL_MODALITIES": "mmfm.eval.runner", "EvalConfig": "mmfm.eval.runner",
         "PromptEval": "mmfm.eval.runner"}


def __getattr__(name: str):
    """The heavy modules load on first use, so `mmfm --help` (which builds this package's parser) stays quick."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmfm.eval' has no attribute {name!r}")


def default_corpus(export: str) -> str:
    """`mmfm demo e2e --out D` writes D/export and D/corpus: the export's sibling."""
    return os.path.join(os.path.dirname(os.path.abspath(export.rstrip("/"))), "corpus")


def prompts(model: str, corpus: str | None = None, n: int = 50, modalities=None, json: str | None = None,
            cache_dir: str | None = None, config=None, threads: int = 0) -> list[dict]:
    """Run the prompt-following eval of an exported model folder; returns the bench records (and
    writes them to `json` as a JSON list). corpus: the demo corpus (default: the export's sibling
    folder `corpus`, as mmfm demo e2e lays them out). modalities: a subset of ALL_MODALITIES.
    cache_dir: where fitted scorers are kept (default <corpus>/.scorers)."""
    return evaluate(model, corpus, n, modalities, json, cache_dir, config, threads).records


def evaluate(model: str, corpus: str | None = None, n: int = 50, modalities=None, json: str | None = None,
             cache_dir: str | None = None, config=None, threads: int = 0):
    """`prompts`, returning the PromptEval after its run (records, notes, prompt sets)."""
    import torch

    from mmfm.eval.gen import load_export
    from mmfm.eval.runner import PromptEval

    if threads:
        torch.set_num_threads(threads)
    net, vocab, toks = load_export(str(model))
    corpus = corpus or default_corpus(str(model))
    if not os.path.isdir(corpus):
        raise FileNotFoundError(f"--corpus {corpus!r}: no such folder (the demo corpus the model was trained on; "
                                "default: the export's sibling folder 'corpus')")
    ev = PromptEval(corpus, vocab, toks, n=n, modalities=modalities, config=config, cache_dir=cache_dir)
    ev.run(net)
    if json:
        os.makedirs(os.path.dirname(os.path.abspath(json)), exist_ok=True)
        write_records(ev.records, json)
    return ev


__all__ = ["ALL_MODALITIES", "EvalConfig", "PromptEval", "Sampling", "default_corpus", "evaluate", "prompts"]
