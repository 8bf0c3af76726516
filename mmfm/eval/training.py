"""The prompt-following eval inside training (issue: "the same scorers run during training"):
`evaluators_for(cfg)` turns a pretrain config's `eval_prompts:` section into a Trainer evaluator,
(engine, step) -> {"prompts/<modality>/<task>": figure}, run beside the held-out loss at the start,
every train.eval_every steps and at the end, and logged to metrics.jsonl and TensorBoard.

Every rank runs it on the same seeded prompts (as the held-out loss does), so under ZeRO-3 the
parameter gathers of each forward happen on all ranks alike; only rank 0 writes the log. The
model-free work (prompt sets, fitted scorers, real-data ceilings) is done once, when the evaluator
is built, so each call costs only generation and scoring."""
from __future__ import annotations

import os


def evaluators_for(cfg) -> list:
    """[evaluator] for a RunConfig whose eval_prompts.n > 0, else []."""
    p = cfg.eval_prompts
    if not p.n:
        return []
    from mmfm.eval.gen import Sampling
    from mmfm.eval.runner import ALL_MODALITIES, EvalConfig, PromptEval
    from mmfm.tokenizers import load_tokenizer
    from mmfm.tokenizers.base import tokenizer_folders
    from mmfm.vocab import Vocab

    where = f"{cfg.path}: eval_prompts"
    if not os.path.isdir(p.corpus):
        raise FileNotFoundError(f"{where}.corpus: {p.corpus!r} is not a folder (the demo corpus the tokens came from)")
    vocab = Vocab.load(cfg.data.vocab)
    wanted = list(p.modalities) or [m for m in vocab.ranges if m in ALL_MODALITIES]
    folders = tokenizer_folders(p.tokenizers, wanted)
    missing = [m for m in wanted if m not in folders]
    if missing:
        raise FileNotFoundError(f"{where}.tokenizers: no tokenizer.yaml for {', '.join(missing)} under {p.tokenizers!r} "
                                "(expected <folder>/<modality>/ or <folder>/<modality>/tokenizer/)")
    toks = {m: load_tokenizer(f) for m, f in folders.items()}
    ev = PromptEval(p.corpus, vocab, toks, n=p.n, modalities=wanted, cache_dir=p.cache_dir or None,
                    config=EvalConfig(sampling=Sampling(cfg_scale=p.cfg_scale,
                                                       cfg_by_modality=dict(p.cfg_by_modality))))

    def prompts(engine, step: int) -> dict:
        model = getattr(engine, "module", engine)
        return {f"prompts/{k}": v for k, v in ev.run(model).items()}

    return [prompts]
