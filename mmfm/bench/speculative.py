"""Benchmark of speculative and masked decoding against plain decoding, side by side in one
process, on repetitive text (Python standard-library source from the running interpreter).

Impls, and exactly what each timed call covers (one call per prompt, prompts in turn, the same
model, settings and seeds; prefill included everywhere; no stop token, --new-tokens each):
    mmfm                          the real decode loop `mmfm generate` runs: mmfm.generate.decode
                                  (ragged prefill, then DenseStep + the fused `sample` op per
                                  token), batch 1
    mmfm_token_recycling          token_recycling_generate with the static template tree
                                  (--tree-size nodes), tree passes through DenseStep.tree, the
                                  adaptive back-off on, context chains on (the defaults); one
                                  matrix across the prompts (the paper's hot start), fresh for
                                  every timed run
    mmfm_token_recycling_matrix   the same without context chains (context_draft=0): the
                                  recycled matrix's trees alone, as in the paper
    mmfm_token_recycling_dynamic  the same with DySpec dynamic trees (tree="dynamic")
    mmfm_draft_model              draft_model_generate, the drafter being the target's first
                                  --drafter-layers blocks (layer_drafter), drafting a chain of
                                  --num-draft sampled tokens
    mmfm_draft_model_dynamic      the same drafter growing a DySpec tree of its top --draft-k
                                  tokens per node (--tree-size nodes), one target pass per tree
Each case is a sampling mode: greedy (temperature 0; every impl must emit the plain loop's
tokens, checked and recorded as `same_as_plain`) and sample (temperature 1, or
--sample-temperature; lossless by construction and by tests/test_speculative.py; the tree impls
draw every position from the plain loop's Philox stream, so they too emit its tokens and record
`same_as_plain`). Figures: wall ms and process CPU ms (median of --repeats interleaved rounds
after a warm-up round; on a shared machine the CPU time is the steadier of the two), tokens/s
and the acceptance length (tokens per target pass). Within a round every prompt is decoded by
every impl back to back (order reversed in alternate rounds), so a drift of the machine's speed
hits all impls alike; `speedup_cpu` is the median over rounds of the plain loop's CPU time over
the impl's, with a ~95% interval for that median (`speedup_cpu_lo` / `_hi`, sign test).

Case `tree_compare` (DySpec's claim): static template vs dynamic tree at the same node budget,
back-off and gate off (a tree every pass), tokens per target pass in greedy and sample mode, for
Token Recycling's trees and for draft-model trees (the layer drafter's top --draft-k tokens per
node, grown level by level; also the drafter passes per target pass).
Case `multidraft`: the optimal multi-draft acceptance rate (mmfm.generate.multidraft) for target
and draft distributions taken from the model (target: the model's next-token distribution over
its top --md-vocab tokens at a prompt position; draft: the layer drafter's over the same tokens),
beside recursive rejection sampling's exact rate and the rate measured with verify_multi_draft.

Masked decoding (case `masked`): MaskGIT (--maskgit-steps full passes) vs ReCAP (the same step
count, a full pass every --full-every steps), full passes, token evaluations and time; the
speed-up is compute only (the demo model is not trained with the masked objective).

The model: --model (an `mmfm export` folder, default runs/demo/export; its vocab.json and text
tokenizer under tokenizers/text or --tokenizers), or, when that folder does not exist, a
byte-level model of the demo's shape trained here for --train-steps on standard-library source.
The fused sampling op must come from the compiled extension: the bench stops if it is missing.

    mmfm bench speculative [--json PATH] [--quick] [--model DIR]
"""
from __future__ import annotations

import glob
import inspect
import importlib
import math
import os
import sys
import time

import torch

from mmfm.bench.common import base_parser, machine, parse_args, record, report
from mmfm.generate.decode import SamplingConfig, decode
from mmfm.generate.multidraft import optimal_acceptance, rrs_acceptance
from mmfm.generate.masked import maskgit_decode, recap_decode
from mmfm.generate.recycling import RecyclingMatrix
from mmfm.generate.speculative import draft_model_generate, layer_drafter, token_recycling_generate
from mmfm.models import KVCache, ModelConfig, Transformer
from mmfm.ops import sampling

PROMPT_MODULES = ("textwrap", "json.encoder", "string", "shlex", "fnmatch", "glob")
MODES = {"greedy": dict(temperature=0.0), "sample": dict(temperature=1.0)}
# masked decoding ids; the byte stand-in has no <mask>, so byte 3 plays it (timing only)
MASKED_SETUP = {"mask_id": 3, "allowed_range": (4, 256), "prefix": [1, 2]}


def stdlib_sources(n: int) -> list[str]:
    return [inspect.getsource(importlib.import_module(m)) for m in PROMPT_MODULES[:n]]


# ------------------------------------------------------------------------------------ models
def load_export(folder: str, tokenizers: str | None = None):
    """(model, encode(text) -> global ids, description) from an `mmfm export` folder (its text
    tokenizer under `tokenizers`/text, default the folder's tokenizers/)."""
    from mmfm.models.io import load
    from mmfm.tokenizers import load_tokenizer
    from mmfm.vocab import Vocab

    model = load(folder)
    vocab = Vocab.load(os.path.join(folder, "vocab.json"))
    text_dir = os.path.join(tokenizers or os.path.join(folder, "tokenizers"), "text")
    tok_dirs = [d for d in (os.path.join(text_dir, "tokenizer"), text_dir)
                if os.path.exists(os.path.join(d, "tokenizer.yaml")) or glob.glob(os.path.join(d, "*.model"))]
    if not tok_dirs:
        raise FileNotFoundError(f"{folder}: no text tokenizer under tokenizers/text")
    tok = load_tokenizer(tok_dirs[0])

    def encode(text: str) -> list[int]:
        return [vocab.bos_id] + vocab.to_global("text", tok.encode(text)).tolist()

    if "image" in vocab.ranges:   # masked decoding: an image block after <bos> <image>
        r = vocab.ranges["image"]
        MASKED_SETUP.update(mask_id=vocab.mask_id, allowed_range=(r.start, r.stop),
                            prefix=[vocab.bos_id, vocab.begin_id("image")])
    return model, encode, f"export {folder}"


def byte_model(steps: int, seed: int = 0, cache: bool = True):
    """A byte-level model of the demo model's shape (dim 128, 4 layers), trained `steps` Adam
    steps on standard-library source other than the prompt modules; cached in /tmp unless
    cache=False (--quick)."""
    path = f"/tmp/mmfm_bench_speculative_bytes_{steps}.pt"
    if cache:
        cfg = ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=344, vocab_size=256,
                          max_seq_len=512)
    else:   # --quick: a toy model, so the smoke test stays fast
        cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=256,
                          max_seq_len=128)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    if cache and os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), lambda s: list(s.encode()), f"bytes model, {steps} steps (cached {path})"
    if steps == 0:   # an untrained model: enough for the smoke test, and avoids the optimizer import
        return model.eval(), lambda s: list(s.encode()), "bytes model, untrained"
    from tqdm import tqdm

    mods = ("collections", "dataclasses", "argparse", "pathlib", "functools", "typing", "enum", "tokenize",
            "inspect", "copy", "pprint", "difflib", "calendar", "configparser")
    text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in mods).encode()
    data = torch.tensor(list(text), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in tqdm(range(steps), desc="train bytes model", file=sys.stderr):
        lr = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        n = 257 if cache else 33
        starts = torch.randint(0, len(data) - n, (16 if cache else 4,), generator=g)
        batch = torch.stack([data[s:s + n] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"# bytes model: final train loss {loss.item():.3f}", file=sys.stderr)
    if cache:
        torch.save(model.state_dict(), path)
    return model.eval(), lambda s: list(s.encode()), f"bytes model, {steps} steps"


# ------------------------------------------------------------------------------------ decoding
@torch.no_grad()
def plain_generate(model, prompt, max_new_tokens, seed, **settings):
    """The baseline: the decode loop of `mmfm generate` (mmfm.generate.decode: DenseStep + sample)."""
    rows = decode(model, [torch.tensor(prompt)], None, SamplingConfig(**settings), max_new_tokens=max_new_tokens,
                  seed=seed, stop_on_done=False)
    return rows[0].tolist(), None


IMPLS = ("mmfm", "mmfm_token_recycling", "mmfm_token_recycling_matrix", "mmfm_token_recycling_dynamic",
         "mmfm_draft_model", "mmfm_draft_model_dynamic")


def run_prompt(name, model, drafter, i, p, args, settings, matrix):
    """(wall seconds, CPU seconds, output, stats) of one impl on prompt i; Token Recycling keeps
    `matrix` across the prompts of a round (the paper's hot start), fresh for every round."""
    t0, c0 = time.perf_counter(), time.process_time()
    if name == "mmfm":
        o, s = plain_generate(model, p, args.new_tokens, args.seed * 1000 + i, **settings)
    elif name.startswith("mmfm_token_recycling"):
        tree = "dynamic" if name.endswith("dynamic") else "static"
        o, s = token_recycling_generate(model, p, max_new_tokens=args.new_tokens, seed=args.seed * 1000 + i,
                                        matrix=matrix, tree_size=args.tree_size, tree=tree,
                                        context_draft=0 if name.endswith("_matrix") else None, **settings)
        o = o.tolist()
    else:
        tree = {"tree": "dynamic", "tree_size": args.tree_size, "k": args.draft_k,
                "max_depth": args.draft_depth} if name.endswith("dynamic") else {}
        o, s = draft_model_generate(model, drafter, p, max_new_tokens=args.new_tokens, seed=args.seed * 1000 + i,
                                    num_draft=args.num_draft, **tree, **settings)
        o = o.tolist()
    return time.perf_counter() - t0, time.process_time() - c0, o, s


def run_round(impls, model, drafter, prompts, args, settings, reverse: bool) -> dict:
    """One timed round: every prompt decoded by every impl back to back (the order reversed in
    alternate rounds), so a drift of the machine's speed within the round hits all impls alike.
    {impl: (wall s, CPU s, outputs, stats list, matrix)} summed over the prompts."""
    order = impls[::-1] if reverse else impls
    res = {n: [0.0, 0.0, [], [], RecyclingMatrix(model.cfg.vocab_size, k=args.k)] for n in impls}
    for i, p in enumerate(prompts):
        for name in order:
            r = res[name]
            sec, csec, o, s = run_prompt(name, model, drafter, i, p, args, settings, r[4])
            r[0] += sec
            r[1] += csec
            r[2].append(o)
            r[3].append(s)
    return {n: tuple(v) for n, v in res.items()}


def paired_speedup(base: list[float], impl: list[float]) -> tuple[float, float, float]:
    """(median, low, high) over rounds of base time / impl time, the interval ~95% for the median
    (order statistics, sign test): what the paired rounds say, with how sure they are."""
    xs = sorted(b / t for b, t in zip(base, impl))
    n = len(xs)
    k = max(0, int(n / 2 - 1.96 * math.sqrt(n) / 2))
    return xs[n // 2], xs[k], xs[n - 1 - k]


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _settings(mode: str, args) -> dict:
    """The sampler settings of a mode: sample at --sample-temperature."""
    return dict(MODES[mode], temperature=args.sample_temperature) if mode == "sample" else dict(MODES[mode])


def _temperature(mode: str, args) -> dict:
    """The case's temperature entry: only for mode sample away from temperature 1."""
    return {"temperature": args.sample_temperature} if mode == "sample" and args.sample_temperature != 1.0 else {}


def bench_decoding(model, encode, desc, args) -> list[dict]:
    sources = stdlib_sources(args.prompts)
    prompts = [encode(s)[:args.prompt_tokens] for s in sources]
    drafter = layer_drafter(model, args.drafter_layers)
    impls = [n for n in IMPLS if n in args.impls]
    records = []
    for mode in args.modes:
        settings = _settings(mode, args)
        case = {"mode": mode, "prompts": len(prompts), "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens, "seed": args.seed, "model": desc}
        case.update(_temperature(mode, args))
        wall = {name: [] for name in impls}
        cpu = {name: [] for name in impls}
        run_round(impls, model, drafter, prompts[:1], args, settings, False)   # warm-up (untimed)
        for r in range(args.repeats):             # interleaved per prompt: load changes hit every impl alike
            results = run_round(impls, model, drafter, prompts, args, settings, reverse=r % 2 == 1)
            for name in impls:
                wall[name].append(results[name][0])
                cpu[name].append(results[name][1])
        plain_outs = results["mmfm"][2]
        for name in impls:
            _, _, outs, stats, matrix = results[name]
            sec, csec = _median(wall[name]), _median(cpu[name])
            n_tok = sum(len(o) for o in outs)
            fig = {"ms": sec * 1e3, "cpu_ms": csec * 1e3, "tokens_per_s": n_tok / sec, "tokens": n_tok}
            if name != "mmfm":   # paired by round: plain CPU time / this impl's, median and ~95% interval
                med, lo, hi = paired_speedup(cpu["mmfm"], cpu[name])
                fig.update(speedup_cpu=round(med, 3), speedup_cpu_lo=round(lo, 3), speedup_cpu_hi=round(hi, 3))
            if stats[0] is not None:
                passes = sum(s.target_passes for s in stats)
                fig["acceptance_length"] = round(sum(s.new_tokens - 1 for s in stats) / max(passes, 1), 3)
                fig["target_passes"] = passes
                fig["tree_passes"] = sum(len(s.tree_nodes) for s in stats)
                fig["plain_passes"] = sum(s.plain_passes + s.gated_passes for s in stats)
                fig["run_steps"] = sum(s.run_steps for s in stats)      # plain passes taken in idle runs
                fig["chain_passes"] = sum(s.chain_passes for s in stats)  # passes holding a context chain
                fig["chain_accepted"] = sum(s.chain_accepted for s in stats)   # drafts only the chains had
            else:
                fig["acceptance_length"] = 1.0
                fig["target_passes"] = n_tok - len(outs)
            if name.startswith("mmfm_token_recycling"):
                fig["matrix_bytes"] = matrix.nbytes
                fig["tree_size"] = args.tree_size
            if name.startswith("mmfm_draft_model"):
                fig["drafter_layers"] = args.drafter_layers
                if name.endswith("dynamic"):
                    fig["tree_size"], fig["k"] = args.tree_size, args.draft_k
                else:
                    fig["num_draft"] = args.num_draft
            if mode == "greedy" or name != "mmfm_draft_model":
                # sampled trees draw each position from the plain loop's stream (speculative._Rng.at),
                # so they too emit its tokens; a chain of sampled drafts does not (verify_chain)
                fig["same_as_plain"] = outs == plain_outs
            records.append(record("speculative", case, name, **fig))
    return records


def _tree_record(case: dict, impl: str, stats: list, drafter: bool = False) -> dict:
    """tree_compare's figures over one impl's runs: tokens per target pass, mean tree size and,
    for draft-model trees, drafter passes per target pass."""
    passes = sum(s.target_passes for s in stats)
    nodes = [n for s in stats for n in s.tree_nodes]
    extra = {"draft_passes_per_target_pass": round(sum(s.draft_passes for s in stats) / passes, 2)} if drafter else {}
    return record("speculative", case, impl, acceptance_length=round(sum(s.new_tokens - 1 for s in stats) / passes, 3),
                  target_passes=passes, mean_tree_nodes=round(sum(nodes) / len(nodes), 2), **extra)


def bench_tree_compare(model, encode, desc, args) -> list[dict]:
    """Tokens per target pass, static template vs dynamic tree at the same node budget, with a
    tree every pass (back-off and gate off), on the same prompts, one matrix per run; and the
    same for draft-model trees (the drafter's top --k tokens per node; drafter = the target's
    first --drafter-layers blocks), with the drafter passes each tree took."""
    prompts = [encode(s)[:args.prompt_tokens] for s in stdlib_sources(args.prompts)]
    out = []
    drafter = layer_drafter(model, args.drafter_layers)
    for mode in args.modes:
        for size in args.compare_sizes:
            case = {"mode": "tree_compare", "sampling": mode, "tree_size": size, "prompts": len(prompts),
                    "new_tokens": args.new_tokens, "model": desc, "drafter_layers": args.drafter_layers,
                    "k": args.draft_k, "max_depth": args.draft_depth, **_temperature(mode, args)}
            for tree in ("static", "dynamic"):
                stats = [draft_model_generate(model, drafter, p, max_new_tokens=args.new_tokens, seed=i, tree=tree,
                                              tree_size=size, k=args.draft_k, max_depth=args.draft_depth,
                                              **_settings(mode, args))[1] for i, p in enumerate(prompts)]
                out.append(_tree_record(case, f"mmfm_draft_model_{tree}", stats, drafter=True))
    for mode in args.modes:
        for size in args.compare_sizes:
            case = {"mode": "tree_compare", "sampling": mode, "tree_size": size, "prompts": len(prompts),
                    "new_tokens": args.new_tokens, "model": desc, **_temperature(mode, args)}
            for tree in ("static", "dynamic"):
                matrix = RecyclingMatrix(model.cfg.vocab_size, k=args.k)
                stats = [token_recycling_generate(model, p, max_new_tokens=args.new_tokens, seed=i, matrix=matrix,
                                                  tree_size=size, tree=tree, adaptive=False, min_value=0.0,
                                                  min_expected=0.0, **_settings(mode, args))[1]
                         for i, p in enumerate(prompts)]
                out.append(_tree_record(case, f"mmfm_token_recycling_{tree}", stats))
    return out


@torch.no_grad()
def bench_multidraft(model, encode, desc, args) -> list[dict]:
    """Optimal vs recursive-rejection acceptance on distributions from the model and its drafter."""
    prompt = encode(stdlib_sources(1)[0])[:args.prompt_tokens]
    ids = torch.tensor([prompt])
    target = torch.softmax(model(ids)[0].double(), -1)
    draft = torch.softmax(layer_drafter(model, args.drafter_layers)(ids)[0].double(), -1)
    V, N = args.md_vocab, args.md_samples
    out = []
    for pos in args.md_positions:
        pos = min(pos, len(prompt) - 1)
        top = target[pos].topk(V).indices
        p = target[pos, top] / target[pos, top].sum()
        q = draft[pos, top] / draft[pos, top].sum()
        for k in (1, 2, 3):
            for rep in (True, False):
                case = {"mode": "multidraft", "position": pos, "vocab": V, "k": k, "replacement": rep,
                        "tv_distance": round(0.5 * float((p - q).abs().sum()), 4), "model": desc}
                g = torch.Generator().manual_seed(pos * 10 + k)
                cand = torch.multinomial(q.float().expand(N, V), k, replacement=rep, generator=g)
                _, idx = sampling.verify_multi_draft(p.float().expand(N, V).contiguous(),
                                                     q.float().expand(N, V).contiguous(), cand, replacement=rep,
                                                     seed=pos, offset=k)
                measured = float((idx >= 0).double().mean())
                out.append(record("speculative", case, "mmfm_verify_multi_draft", acceptance=round(measured, 4),
                                  stderr=round((measured * (1 - measured) / N) ** 0.5, 4),
                                  rrs_exact=round(rrs_acceptance(p, q, k, rep), 4),
                                  optimal=round(optimal_acceptance(p, q, k, rep), 4)))
    return out


def bench_masked(model, args) -> list[dict]:
    """MaskGIT vs ReCAP timing on the model's architecture with bidirectional attention."""
    prefix = torch.tensor([MASKED_SETUP["prefix"]]).expand(args.masked_batch, -1)
    case = {"mode": "masked", "length": args.masked_length, "batch": args.masked_batch, "steps": args.maskgit_steps}
    kw = dict(mask_id=MASKED_SETUP["mask_id"], allowed_range=MASKED_SETUP["allowed_range"], seed=0)
    impls = {"mmfm_maskgit": lambda: maskgit_decode(model, prefix, args.masked_length, steps=args.maskgit_steps, **kw)}
    for fe in args.full_every:
        impls[f"mmfm_recap_full_every_{fe}"] = (
            lambda fe=fe: recap_decode(model, prefix, args.masked_length, steps=args.maskgit_steps, full_every=fe,
                                       **kw))
    times = {n: [] for n in impls}
    stats = {}
    for fn in impls.values():
        fn()
    for _ in range(args.repeats):
        for n, fn in impls.items():
            t0 = time.perf_counter()
            _, stats[n] = fn()
            times[n].append(time.perf_counter() - t0)
    out = []
    for n in impls:
        sec = sorted(times[n])[len(times[n]) // 2]
        out.append(record("speculative", case, n, ms=sec * 1e3,
                          tokens_per_s=args.masked_length * args.masked_batch / sec, **stats[n].as_dict()))
    return out


def main(argv=None) -> int:
    p = base_parser("speculative", __doc__.split("\n\n")[0], threads_help="0 = leave as is")
    p.add_argument("--model", default="runs/demo/export", help="an `mmfm export` folder (default: the one make demo writes)")
    p.add_argument("--tokenizers", default=None, help="folder holding the export's tokenizers (default MODEL/tokenizers)")
    p.add_argument("--train-steps", type=int, default=300,
                   help="steps of the byte-level stand-in model when --model does not exist")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    p.add_argument("--impls", nargs="*", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--cases", nargs="*", default=["decode", "tree_compare", "multidraft", "masked"],
                   choices=["decode", "tree_compare", "multidraft", "masked"])
    p.add_argument("--prompts", type=int, default=3, help=f"stdlib modules used as prompts (of {PROMPT_MODULES})")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="sampling seeds: prompt i uses SEED * 1000 + i")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--sample-temperature", type=float, default=1.0,
                   help="mode sample's temperature (> 0; recorded in the case when not 1)")
    p.add_argument("--tree-size", type=int, default=20, help="draft-tree nodes (20 suits a small model on CPU)")
    p.add_argument("--compare-sizes", type=int, nargs="*", default=[10, 20], help="tree sizes of case tree_compare")
    p.add_argument("--k", type=int, default=8, help="candidates per matrix row")
    p.add_argument("--num-draft", type=int, default=4)
    p.add_argument("--drafter-layers", type=int, default=1)
    p.add_argument("--draft-k", type=int, default=4, help="draft-model trees: children per node (the drafter's top k)")
    p.add_argument("--draft-depth", type=int, default=6, help="draft-model trees: maximum depth")
    p.add_argument("--md-vocab", type=int, default=6, help="multidraft: tokens kept of each distribution")
    p.add_argument("--md-positions", type=int, nargs="*", default=[40, 120, 200])
    p.add_argument("--md-samples", type=int, default=40000)
    p.add_argument("--masked-length", type=int, default=256)
    p.add_argument("--masked-batch", type=int, default=1)
    p.add_argument("--maskgit-steps", type=int, default=12)
    p.add_argument("--full-every", type=int, nargs="*", default=[2, 3])
    args = parse_args(p, argv, cpu_only="wired up")
    if args is None:   # also when mmfm._C is not loaded: the impls are named for its compiled ops
        return 2
    if not args.sample_temperature > 0:
        print(f"mmfm bench speculative: --sample-temperature must be > 0 (greedy is mode greedy), got "
              f"{args.sample_temperature}", file=sys.stderr)
        return 2
    if args.quick:
        args.prompts, args.new_tokens, args.prompt_tokens, args.repeats = 1, 16, 32, 1
        args.masked_length, args.maskgit_steps, args.train_steps = 16, 4, min(args.train_steps, 5)
        args.compare_sizes, args.md_positions, args.md_samples = [6], [10], 2000
    if os.path.exists(os.path.join(args.model, "mmfm_model.json")):
        model, encode, desc = load_export(args.model, args.tokenizers)
    else:
        print(f"# {args.model} is not an export folder: using a byte-level stand-in model", file=sys.stderr)
        model, encode, desc = byte_model(args.train_steps, cache=not args.quick)
    print(f"# speculative benchmark on {machine()}; model: {desc}", file=sys.stderr)
    records = []
    if "decode" in args.cases:
        records += bench_decoding(model, encode, desc, args)
    if "tree_compare" in args.cases:
        records += bench_tree_compare(model, encode, desc, args)
    if "multidraft" in args.cases:
        records += bench_multidraft(model, encode, desc, args)
    if "masked" in args.cases:
        records += bench_masked(model, args)
    return report(records, args.json, summary(records), figures=("ms", "cpu_ms", "tokens_per_s", "acceptance_length",
                                                                 "target_passes", "full_passes", "cheap_passes",
                                                                 "same_as_plain", "acceptance", "rrs_exact",
                                                                 "optimal"))


def summary(records: list[dict]) -> list[str]:
    lines = []
    base = {}
    for r in records:
        if r["impl"] in ("mmfm", "mmfm_maskgit"):
            base[r["case"]["mode"]] = r
    for r in records:
        b = base.get(r["case"]["mode"])
        if b and r["impl"] not in ("mmfm", "mmfm_maskgit"):
            extra = f", acceptance length {r['acceptance_length']}" if "acceptance_length" in r else \
                f", {r['full_passes']} full + {r['cheap_passes']} cheap passes"
            cpu = f", {b['cpu_ms'] / r['cpu_ms']:.2f}x by CPU time" if "cpu_ms" in r and "cpu_ms" in b else ""
            if "speedup_cpu" in r:
                cpu += (f" (paired by round: {r['speedup_cpu']:.2f}x, ~95% interval {r['speedup_cpu_lo']:.2f}-"
                        f"{r['speedup_cpu_hi']:.2f})")
            lines.append(f"{r['case']['mode']}: {r['impl']} {b['ms'] / r['ms']:.2f}x the baseline's speed by wall "
                         f"time{cpu}{extra}")
        if r["case"]["mode"] == "tree_compare":
            lines.append(f"tree_compare {r['case']['sampling']} size {r['case']['tree_size']}: {r['impl']} "
                         f"{r['acceptance_length']} tokens per pass")
    return lines


if __name__ == "__main__":
    sys.exit(main())
