"""`mmfm eval prompts --model EXPORT [--corpus DIR] [--json PATH] [--n N] [--modalities M ...]`:
the prompt-following eval (mmfm.eval.evaluate) and its table.
`mmfm eval lm --model EXPORT --tasks T ... [--include-path DIR] [--json PATH]`: lm-evaluation-harness
on the export's text side (mmfm/eval/lm.py).
`mmfm eval bpb --model EXPORT [--corpus DIR] [--window N] [--json PATH]`: held-out bits per byte of
the export's text side on the demo corpus' held-out documents (mmfm/eval/bits_per_byte.py)."""
from __future__ import annotations

import sys

ALIASES = {"3d": "shape3d"}
GENERATED = ("image", "audio", "video", "shape3d", "physics")   # what guidance applies to (not text)


def _fmt(v, metric: str) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if metric == "ppl" else f"{v:.3f}"


def table(records: list[dict]) -> str:
    """One line per (modality, task): the model's figure, its baselines, the ceiling and n."""
    rows: dict[tuple, dict] = {}
    for r in records:
        rows.setdefault((r["case"]["modality"], r["case"]["task"]), {})[r["impl"]] = r
    lines = [f"{'modality':<9} {'task':<15} {'metric':<9} {'n':>5} {'mmfm':>8}  {'baseline':<34} {'ceiling':<20}"]
    for (modality, task), by in rows.items():
        metric = next(k for k in ("accuracy", "rel_l2", "ppl") if k in next(iter(by.values())))
        mine = by.get("mmfm", {})
        base = ", ".join(f"{impl} {_fmt(r[metric], metric)}" for impl, r in by.items()
                         if impl not in ("mmfm", "ceiling"))
        ceil = by.get("ceiling")
        if ceil is None:
            ceiling = "-"
        elif "accuracy_raw" in ceil:
            ceiling = f"{_fmt(ceil[metric], metric)} (raw {_fmt(ceil['accuracy_raw'], metric)})"
        else:
            ceiling = f"{_fmt(ceil[metric], metric)} (tokenizer)"
        n = mine.get("n", next(iter(by.values())).get("n", 0))
        lines.append(f"{modality:<9} {task:<15} {metric:<9} {n:>5} {_fmt(mine.get(metric), metric):>8}  "
                     f"{base:<34} {ceiling:<20}")
    return "\n".join(lines)


def cmd_eval_lm(args) -> int:
    from mmfm.eval import lm

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if not args.tasks:
        print("mmfm eval lm: --tasks is required (lm_eval task names)", file=sys.stderr)
        return 2
    try:
        data = lm.run(args.model, args.tasks, include_path=args.include_path, out=args.json, limit=args.limit,
                      batch_size=args.batch_size or 1, device=args.device, num_fewshot=args.num_fewshot,
                      log_samples=args.log_samples, seed=args.seed)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"mmfm eval lm: {exc}", file=sys.stderr)
        return 2
    print(lm.table(data))
    if args.json:
        print(f"(lm_eval results in {args.json})")
    return 0


def cmd_eval_bpb(args) -> int:
    from mmfm.eval import default_corpus
    from mmfm.eval.bits_per_byte import export_bits_per_byte, held_out_documents
    from mmfm.jsonio import write_json

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        texts = held_out_documents(args.corpus or default_corpus(args.model))
        r = export_bits_per_byte(args.model, texts, window=args.window, device=args.device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mmfm eval bpb: {exc}", file=sys.stderr)
        return 2
    print(f"held-out bits/byte {r.bits_per_byte:.4f} ({r.documents} documents, {r.bytes} bytes, {r.tokens} tokens: "
          f"{r.bits_per_token:.4f} bits/token, {r.tokens_per_byte:.4f} tokens/byte; window {r.window}, "
          f"stride {r.stride})")
    if r.lossless_documents < r.documents:
        print(f"note: the text tokenizer does not reproduce {r.documents - r.lossless_documents} of the documents "
              "(e.g. sentencepiece's normalization): the figure counts bytes it does not model")
    if args.json:
        write_json(args.json, {"model": args.model, **r.to_dict()})
    return 0


def cmd_eval(args) -> int:
    if args.eval_command == "lm":
        return cmd_eval_lm(args)
    if args.eval_command == "bpb":
        return cmd_eval_bpb(args)
    if args.eval_command != "prompts":
        print(f"mmfm eval: unknown eval {args.eval_command!r}; available: prompts, lm, bpb", file=sys.stderr)
        return 2
    import time

    from mmfm.eval import EvalConfig, Sampling, evaluate
    from mmfm.eval.gen import parse_guidance

    modalities = [ALIASES.get(m, m) for m in args.modalities] if args.modalities else None
    try:
        scale, per = parse_guidance(args.cfg_scale, GENERATED)
    except ValueError as exc:
        print(f"mmfm eval prompts: {exc}", file=sys.stderr)
        return 2
    cfg = EvalConfig(sampling=Sampling(temperature=args.temperature, top_k=args.top_k, cfg_scale=scale,
                                       cfg_by_modality=per, seed=args.seed, batch_size=args.batch_size or 64,
                                       decode=args.decode, steps=args.steps, hybrid=args.hybrid,
                                       refine=args.refine))
    t0 = time.perf_counter()
    try:
        ev = evaluate(args.model, args.corpus, n=args.n, modalities=modalities, json=args.json,
                      cache_dir=args.cache_dir, config=cfg, threads=args.threads)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mmfm eval prompts: {exc}", file=sys.stderr)
        return 2
    print(table(ev.records))
    for note in ev.notes:
        print(f"note: {note}")
    print(f"({time.perf_counter() - t0:.0f} s; chance: a prompt-blind model drawing training labels; ceiling: the "
          f"scorer on the prompts' real samples after the tokenizer round trip"
          + (f"; records in {args.json})" if args.json else ")"))
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an exported model: prompts (does generation follow the prompt?), "
                                    "lm (lm-evaluation-harness tasks on its text side)")
    p.add_argument("eval_command", choices=("prompts", "lm", "bpb"),
                   help="prompts: generate from held-out demo prompts and score; lm: lm_eval tasks through its hf "
                        "model; bpb: held-out bits per byte of the text side on the corpus' held-out documents")
    p.add_argument("--model", required=True, help="exported model folder (mmfm export / mmfm demo e2e's <out>/export)")
    p.add_argument("--corpus", default=None, help="the demo corpus (default: the export's sibling folder 'corpus')")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the bench records as a JSON list")
    p.add_argument("--n", type=int, default=50,
                   help="prompts (= generated samples) per prompt set (physics: at most 8)")
    p.add_argument("--modalities", nargs="+", default=None, metavar="M",
                   help="text image audio video shape3d (or 3d) physics (default: all the model has)")
    p.add_argument("--cache-dir", default=None, help="fitted scorers (default <corpus>/.scorers)")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=100, help="0 = off")
    p.add_argument("--cfg-scale", action="append", default=None, metavar="[MODALITY=]SCALE",
                   help="classifier-free guidance (1 = off); repeat with MODALITY=SCALE for one modality, "
                        "e.g. --cfg-scale 2 --cfg-scale audio=1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode", choices=("ar", "masked", "cascade"), default="ar",
                   help="prompts: ar (token by token), masked (MaskGIT in --steps passes; a model trained with "
                        "the masked or hybrid objective) or cascade (BAMM: a causal draft, then --refine of it "
                        "regenerated in up to --steps masked passes; a hybrid-trained model)")
    p.add_argument("--steps", type=int, default=8, help="prompts with --decode masked / cascade: bidirectional passes")
    p.add_argument("--hybrid", action="store_true",
                   help="prompts with --decode masked: the hybrid objective's attention (causal over the prompt)")
    p.add_argument("--refine", type=float, default=0.3, help="prompts with --decode cascade: share of the draft "
                                                             "regenerated, in [0, 1]")
    p.add_argument("--batch-size", type=int, default=None, help="rows per decode call (prompts: 64; lm: 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--window", type=int, default=None,
                   help="bpb: tokens per scoring window, stride half of it (default: the model's max_seq_len; "
                        "use the sequence length it was trained at)")
    lm = p.add_argument_group("lm (lm-evaluation-harness; the eval extra)")
    lm.add_argument("--tasks", nargs="+", default=None, metavar="T", help="lm_eval task names (lm: required)")
    lm.add_argument("--include-path", default=None, metavar="DIR", help="a folder of lm_eval task YAML files")
    lm.add_argument("--limit", type=float, default=None, help="documents per task (a fraction when < 1)")
    lm.add_argument("--num-fewshot", type=int, default=None)
    lm.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, cuda:1)")
    lm.add_argument("--log-samples", action="store_true", help="keep every document's requests and answers in --json")
