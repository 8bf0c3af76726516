"""Benchmark of autoregressive generation: tokens/s of mmfm's decoder (static KV cache + fused
`sample`, impl `mmfm`) side by side with Hugging Face transformers' `generate` (`hf_generate`,
`hf_static`) on the same weights (the export's Llama layout, loaded with
LlamaForCausalLM.from_pretrained), the same prompts and the same settings, at batch 1 and 8, in
two modes: `sample` (temperature 0.8, top_k 50, top_p 0.9) and `greedy` (temperature 0 /
do_sample=False; every impl must emit mmfm's tokens, recorded as `same_as_mmfm`). Every impl
generates exactly --new tokens per row (no stop token), prefill included.

    mmfm bench generate [--model EXPORT_DIR] [--json PATH] [--new 128] [--prompt-len 32]

Without --model it uses runs/demo/export when present, else a random-weight model of the demo's
shape (configs/models/small.yaml, vocabulary 3784) exported to a temporary folder: decoding cost
does not depend on the weights' values. Implementations live in IMPLS (name -> function).
What each timed call covers (all rows of one batch, prefill included):
    mmfm                   mmfm.generate.decode: ragged prefill, then DenseStep + the fused `sample`
                           op per token (the loop `mmfm generate` runs)
    hf_generate            LlamaForCausalLM.generate on the same weights, its default DynamicCache
    hf_static              the same with cache_implementation="static" (HF's StaticCache: keys and
                           values preallocated for prompt + new tokens, allocated inside each call,
                           so inside the timing; not torch.compile'd - the eager static-cache path)
    mmfm_token_recycling   batch 1 only: token_recycling_generate (static 20-node trees through
                           DenseStep.tree, the adaptive back-off), a cold matrix per call; on random
                           prompts there is little to recycle, so this row shows the back-off's
                           cost, not a speed-up (that is `mmfm bench speculative`, on code)
The fused sampling op must come from the compiled extension: the bench stops if it is missing.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

from mmfm.bench.common import base_parser, machine, parse_args, record, report
from mmfm.typed_config import packaged_config

SETTINGS = dict(temperature=0.8, top_k=50, top_p=0.9)
MODES = {"sample": SETTINGS, "greedy": dict(temperature=0.0)}
DEMO_EXPORT = "runs/demo/export"
DEMO_VOCAB = 3784


def random_export(folder: str, vocab_size: int = DEMO_VOCAB) -> str:
    """A random small model exported as a real export is: with a unified vocabulary (1,000 text ids,
    the rest one image range), so its generation_config.json suppresses the non-text ids as a demo
    export's does."""
    from mmfm.export import write_folder
    from mmfm.models import Transformer, load_model_config
    from mmfm.vocab import Vocab

    cfg = load_model_config(packaged_config("models/small.yaml"))
    specials = len(Vocab(1000, {"image": 1}).special_tokens)
    vocab = Vocab(1000, {"image": vocab_size - 1000 - specials})
    cfg.vocab_size = vocab.size
    os.makedirs(folder, exist_ok=True)
    vocab_path = os.path.join(folder, "vocab-source.json")
    vocab.save(vocab_path)
    torch.manual_seed(0)
    model = Transformer(cfg)
    return write_folder(model.state_dict(), cfg, folder, vocab_path=vocab_path)


def run_mmfm(model, prompts: torch.Tensor, new: int, seed: int, settings: dict) -> torch.Tensor:
    from mmfm.generate.decode import SamplingConfig, decode

    rows = decode(model, list(prompts), None, SamplingConfig(**settings), max_new_tokens=new, seed=seed,
                  pad_id=0, stop_on_done=False)
    return torch.stack(rows)


def run_hf(hf, prompts: torch.Tensor, new: int, seed: int, settings: dict, cache: str | None = None) -> torch.Tensor:
    torch.manual_seed(seed)
    kw = dict(do_sample=True, **settings) if settings.get("temperature", 1.0) > 0 else dict(do_sample=False)
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=0,
                      cache_implementation=cache, **kw)
    return out[:, prompts.shape[1]:]


def run_hf_static(hf, prompts: torch.Tensor, new: int, seed: int, settings: dict) -> torch.Tensor:
    return run_hf(hf, prompts, new, seed, settings, cache="static")


# name -> (loader(export_dir) -> model or None to share mmfm's,
#          runner(model, prompts, new, seed, settings) -> tokens [B, new])
IMPLS = {
    "mmfm": (lambda d: __import__("mmfm").load(d), run_mmfm),
}


def _load_hf(folder: str):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None    # every impl runs exactly --new steps
    hf.generation_config.pad_token_id = 0
    # an export's generation_config.json suppresses every non-text id (what `mmfm generate --to text`
    # does); mmfm's loop here draws from the whole vocabulary, so HF must too: same tokens, same work
    hf.generation_config.suppress_tokens = None
    return hf


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


if hf_available():
    IMPLS["hf_generate"] = (_load_hf, run_hf)
    IMPLS["hf_static"] = ("hf_generate", run_hf_static)   # shares hf_generate's model


def run_token_recycling(model, prompts: torch.Tensor, new: int, seed: int, settings: dict) -> torch.Tensor:
    """Lossless Token Recycling (docs/speculative.md), one row at a time, the same settings; the
    recycling matrix (and the back-off state it carries) starts cold each call. On random prompts
    there is little to recycle: its figure on repetitive text is `mmfm bench speculative`."""
    from mmfm.generate.speculative import token_recycling_generate

    rows = []
    for i, p in enumerate(prompts):
        toks, _ = token_recycling_generate(model, p, max_new_tokens=new, seed=seed * 1000 + i, tree_size=20,
                                           **settings)
        rows.append(toks)
    return torch.stack(rows)


IMPLS["mmfm_token_recycling"] = ("mmfm", run_token_recycling)   # runs on the `mmfm` impl's model
BATCH1_ONLY = {"mmfm_token_recycling"}   # speculative decoding here verifies one row at a time


def bench(folder: str, batches, new: int, prompt_len: int, repeats: int, label: str,
          modes=tuple(MODES)) -> list[dict]:
    models = {name: load(folder) for name, (load, _) in IMPLS.items() if callable(load)}
    models.update({name: models[load] for name, (load, _) in IMPLS.items() if not callable(load)})
    V = models["mmfm"].cfg.vocab_size
    records = []
    with torch.inference_mode():
        if "hf_generate" in models:   # the same weights: both models give the same logits
            ids = torch.randint(0, V, (1, prompt_len), generator=torch.Generator().manual_seed(0))
            diff = float((models["mmfm"](ids) - models["hf_generate"](ids).logits).abs().max())
            print(f"# mmfm vs transformers logits on one prompt: max |diff| {diff:.2e}", file=sys.stderr)
            if diff > 1e-3:
                raise RuntimeError(f"bench generate: mmfm and transformers disagree on the logits ({diff:.2e})")
        for mode in modes:
            settings = MODES[mode]
            for B in batches:
                g = torch.Generator().manual_seed(B)
                prompts = torch.randint(0, V, (B, prompt_len), generator=g)
                case = {"model": label, "mode": mode, "B": B, "prompt": prompt_len, "new": new}
                names = [n for n in IMPLS if B == 1 or n not in BATCH1_ONLY]
                times = {name: [] for name in names}
                cpu = {name: [] for name in names}
                outs = {}
                for r in range(repeats + 1):   # the first round warms up every impl
                    for name in names:   # interleaved: machine load hits all impls alike
                        fn = IMPLS[name][1]
                        t0, c0 = time.perf_counter(), time.process_time()
                        out = fn(models[name], prompts, new, r, settings)
                        dt, dc = time.perf_counter() - t0, time.process_time() - c0
                        if tuple(out.shape) != (B, new):
                            raise RuntimeError(f"bench generate: {name} returned {tuple(out.shape)}, "
                                               f"expected {(B, new)}")
                        outs[name] = out
                        if r:
                            times[name].append(dt)
                            cpu[name].append(dc)
                for name, ts in times.items():
                    med, cmed = sorted(ts)[len(ts) // 2], sorted(cpu[name])[len(ts) // 2]
                    fig = {"ms": med * 1e3, "cpu_ms": cmed * 1e3, "tokens_per_s": B * new / med}
                    if mode == "greedy":   # the same tokens as the plain loop (ties aside, which the logits check makes rare)
                        fig["same_as_mmfm"] = bool(torch.equal(outs[name], outs["mmfm"]))
                    records.append(record("generate", case, name, **fig))
    return records


def main(argv=None) -> int:
    p = base_parser("generate", __doc__.split("\n\n")[0], threads_help="0 = torch's default")
    p.add_argument("--model", default=None, help=f"exported model folder (default {DEMO_EXPORT} if present, "
                   "else a random-weight model of the demo's shape)")
    p.add_argument("--B", type=int, nargs="*", help="batch sizes (default 1 8)")
    p.add_argument("--new", type=int, default=None, help="new tokens per row (default 128; --quick 16)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    args = parse_args(p, argv, cpu_only="measured here")
    if args is None:
        return 2
    new = args.new or (16 if args.quick else 128)
    batches = args.B or ((1,) if args.quick else (1, 8))
    repeats = 1 if args.quick else args.repeats
    if "hf_generate" not in IMPLS:
        print("# transformers is not installed: no hf_generate records", file=sys.stderr)
    print(f"# generate benchmark on {machine()}; modes {', '.join(f'{m} {MODES[m]}' for m in args.modes)}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        folder, label = args.model, "given"
        if folder is None and os.path.exists(os.path.join(DEMO_EXPORT, "config.json")):
            folder, label = DEMO_EXPORT, "demo"
        if folder is None:
            folder, label = random_export(os.path.join(tmp, "export")), "small-random"
        elif args.model:
            label = os.path.basename(os.path.normpath(args.model))
        records = bench(folder, batches, new, args.prompt_len, repeats, label, args.modes)
    return report(records, args.json, summary(records), figures=("ms", "cpu_ms", "tokens_per_s", "same_as_mmfm"),
                  ratio_to="hf_generate")


def summary(records: list[dict]) -> list[str]:
    """mmfm's speed over each HF impl per case, by wall and by CPU time."""
    lines = []
    cases: dict[str, dict[str, dict]] = {}
    for r in records:
        cases.setdefault(f"{r['case']['mode']} B={r['case']['B']}", {})[r["impl"]] = r
    for key, by in cases.items():
        m = by["mmfm"]
        for name, r in by.items():
            if name != "mmfm":
                lines.append(f"{key}: mmfm {r['ms'] / m['ms']:.2f}x {name}'s speed by wall time, "
                             f"{r['cpu_ms'] / m['cpu_ms']:.2f}x by CPU time")
    return lines


if __name__ == "__main__":
    sys.exit(main())
