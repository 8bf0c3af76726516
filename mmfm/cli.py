"""The one `mmfm` command. Each subcommand is a plain function taking parsed args.

    mmfm doctor                 what is installed, whether the extension loaded
    mmfm demo [e2e|quant]       the main demo: corpus -> tokenizers -> token shards -> ZeRO-2 pretrain -> export
                                (mmfm/demos/e2e.py); quant: VQ and FSQ autoencoders on real digits
    mmfm bench NAME [...]       a benchmark, mmfm/bench/NAME.py (quant, sampling, ...)
    mmfm data SUB [...]         shards: build, verify, demo, select (mmfm/data/commands.py)
    mmfm tokenizer SUB [...]    tokenizers: train, eval (mmfm/tokenizers/commands.py)
    mmfm tokenize --tokenizers DIR --src SHARDS --out DIR   raw shards -> token shards (mmfm/tokenizers/pretokenize.py)
    mmfm pretrain --config X    train under DeepSpeed (mmfm/train/commands.py)
    mmfm finetune --from X --modality M --config Y   one modality, full or LoRA (mmfm/train/finetune.py)
    mmfm export RUN --out DIR   ZeRO checkpoint -> safetensors + Hugging Face folder (mmfm/export)
    mmfm generate --model DIR --prompt P --to M --out PATH   any-to-any decoding (mmfm/generate)
    mmfm cacheaug train|eval    a coprocessor that augments a frozen decoder's KV cache (mmfm/cacheaug)
    mmfm eval prompts --model DIR   does generation follow its prompt? scored against the demo corpus (mmfm/eval)
"""
from __future__ import annotations

import argparse
import sys


def cmd_doctor(args) -> int:
    from mmfm.doctor import main

    return main(args)


def cmd_demo(args) -> int:
    if args.name == "quant":
        from mmfm.demos.quant import main

        if args.out is None:
            args.out = "runs/demo_quant"
        if args.steps is None:
            args.steps = 2000
        return main(args)
    if args.name == "e2e":
        from mmfm.demos.e2e import main

        if args.out is None:
            args.out = "runs/demo"
        return main(args)
    print(f"mmfm demo: unknown demo '{args.name}'; available: e2e, quant", file=sys.stderr)
    return 2


def cmd_bench(args, rest: list[str]) -> int:
    from mmfm.bench import BENCHMARKS, run

    if not args.name or args.name.startswith("-"):
        print(f"usage: mmfm bench NAME [options]; available: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    if args.name not in BENCHMARKS:
        print(f"mmfm bench: unknown benchmark '{args.name}'; available: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    return run(args.name, rest)


def cmd_data(args) -> int:
    from mmfm.data.commands import run_data

    return run_data(args)


def cmd_tokenizer(args) -> int:
    from mmfm.tokenizers.commands import run_tokenizer

    return run_tokenizer(args)


def cmd_tokenize(args) -> int:
    from mmfm.tokenizers.pretokenize import cmd_tokenize as run

    return run(args)


def cmd_pretrain(args) -> int:
    from mmfm.eval.training import evaluators_for
    from mmfm.train.commands import cmd_pretrain as run

    return run(args, make_evaluators=evaluators_for)


def cmd_finetune(args) -> int:
    from mmfm.train.finetune import cmd_finetune as run

    return run(args)


def cmd_export(args) -> int:
    from mmfm.export import cmd_export as run

    return run(args)


def cmd_generate(args) -> int:
    from mmfm.generate.commands import cmd_generate as run

    return run(args)


def cmd_cacheaug(args) -> int:
    from mmfm.cacheaug.commands import cmd_cacheaug as run

    return run(args)


def cmd_eval(args) -> int:
    from mmfm.eval.commands import cmd_eval as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfm", description="multimodal foundation models over one token vocabulary")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="report the install: packages, extension, compiled ops, nvcc, a run's peak memory")
    doctor.add_argument("--run", default="", help="a training output folder (its metrics.jsonl) whose peak memory to "
                        "print; default: the newest metrics.jsonl under ./runs")
    demo = sub.add_parser("demo", help="run a demo")
    demo.add_argument("name", nargs="?", default="e2e", help="which demo: e2e (default, the main job) or quant")
    demo.add_argument("--out", default=None, help="folder for the demo's outputs (runs/demo, runs/demo_quant)")
    demo.add_argument("--steps", type=int, default=None, help="quant: training steps per autoencoder (2000)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--preset", choices=("demo", "long", "test"), default="demo",
                      help="e2e: sizes (long: about an hour on 2 cores; test: toy, for tests)")
    demo.add_argument("--scale", type=float, default=None, help="e2e: demo corpus scale (default from the preset)")
    demo.add_argument("--threads", type=int, default=0, help="e2e: torch threads (0 = torch's default)")
    demo.add_argument("--override", action="append", default=None, metavar="SECTION.FIELD=VALUE",
                      help="e2e: a pretrain config override (repeatable), e.g. train.steps=100")
    bench = sub.add_parser("bench", help="run benchmark NAME (mmfm/bench; its own options follow, --help lists them)",
                           add_help=False)
    bench.add_argument("name", nargs="?", default="", help="benchmark name")
    from mmfm.data.commands import add_data_parser

    add_data_parser(sub)
    from mmfm.tokenizers.commands import add_tokenizer_parser

    add_tokenizer_parser(sub)
    from mmfm.tokenizers.pretokenize import add_tokenize_parser

    add_tokenize_parser(sub)
    from mmfm.train.commands import add_train_parsers

    add_train_parsers(sub)
    from mmfm.train.finetune import add_finetune_parser

    add_finetune_parser(sub)
    from mmfm.export import add_export_parser

    add_export_parser(sub)
    from mmfm.generate.commands import add_generate_parser

    add_generate_parser(sub)
    from mmfm.cacheaug.commands import add_cacheaug_parser

    add_cacheaug_parser(sub)
    from mmfm.eval.commands import add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"doctor": cmd_doctor, "demo": cmd_demo, "data": cmd_data, "tokenizer": cmd_tokenizer, "tokenize": cmd_tokenize,
            "pretrain": cmd_pretrain, "finetune": cmd_finetune, "export": cmd_export,
            "generate": cmd_generate, "cacheaug": cmd_cacheaug, "eval": cmd_eval}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
