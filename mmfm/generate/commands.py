"""`mmfm generate --model EXPORT_DIR --prompt "..." [--image IN.png | --audio IN.wav | ...]
--to text|image|video|audio|3d|physics --out PATH [sampling options]`: a thin wrapper of
Bundle.generate. The sampling options are SamplingConfig's fields (--top-k for top_k, with the
field's type, default and help), so a field added there is a flag here."""
from __future__ import annotations

import dataclasses
import sys
import typing

from mmfm.generate.decode import SamplingConfig

ALIASES = {"3d": "shape3d"}
INPUTS = ("image", "audio", "video", "shape3d", "physics")


def cmd_generate(args) -> int:
    import torch

    from mmfm.generate import Bundle, summary

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        prompts = [""]
    inputs = {m: getattr(args, m) for m in INPUTS if getattr(args, m)}
    to = ALIASES.get(args.to, args.to)
    stats = {} if args.speculative else None
    try:
        bundle = Bundle.load(args.model)
        samples = bundle.generate(prompts, to, sampling=sampling_from_args(args), inputs=inputs, out=args.out,
                                  max_new_tokens=args.max_new_tokens, cfg_scale=args.cfg_scale, seed=args.seed,
                                  progress=not args.no_progress, speculative=args.speculative,
                                  draft_model=args.draft_model, draft_tree=args.draft_tree, stats=stats, coprocessor=args.coprocessor,
                                  augment_every=args.augment_every, decoding=args.decode, steps=args.steps,
                                  recap=args.recap, edit=args.edit, edit_mask=args.edit_mask, refine=args.refine)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mmfm generate: {exc}", file=sys.stderr)
        return 2
    if stats:
        import json

        print(f"speculative ({args.speculative}): " + json.dumps(stats["rows"]), file=sys.stderr)
    if to == "text" and not args.out:
        for s in samples:
            print(s.value)
    else:
        print(summary(samples))
    return 0


def add_sampling_flags(p) -> None:
    """One flag per SamplingConfig field: --top-k for top_k, the field's type, default and help."""
    hints = typing.get_type_hints(SamplingConfig)
    for f in dataclasses.fields(SamplingConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=hints[f.name], default=f.default,
                       help=f"{f.metadata['help']} (default %(default)s)")


def sampling_from_args(args) -> SamplingConfig:
    """The SamplingConfig that add_sampling_flags' flags describe."""
    return SamplingConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingConfig)})


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text, images, video, audio, 3D or physics from an exported model")
    p.add_argument("--model", required=True, help="exported model folder (mmfm export), with vocab.json and tokenizers/")
    p.add_argument("--prompt", action="append", default=None,
                   help="text prompt (repeat for a batch; for --to text it is continued, otherwise it is the caption)")
    p.add_argument("--prompt-file", default=None, help="one prompt per line (added to --prompt)")
    for m in INPUTS:
        p.add_argument(f"--{m}", default=None, metavar="PATH",
                       help=f"{m} input conditioning every prompt (read as in mmfm/generate/outputs.py)")
    p.add_argument("--to", required=True, choices=("text", "image", "video", "audio", "3d", "shape3d", "physics"))
    p.add_argument("--out", default=None, help="output path (batch rows: <stem>-<i><ext>); text prints without it")
    p.add_argument("--max-new-tokens", type=int, default=64, help="text: the most tokens to generate")
    add_sampling_flags(p.add_argument_group("sampling (mmfm.generate.SamplingConfig)"))
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1 = off, 0 = unconditional)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", choices=("token_recycling", "draft"), default=None,
                   help="lossless speculative decoding (text, one row at a time; docs/speculative.md)")
    p.add_argument("--coprocessor", default=None, metavar="DIR",
                   help="cache augmentation: a coprocessor from mmfm cacheaug train (docs/cacheaug.md)")
    p.add_argument("--augment-every", type=int, default=0, metavar="M",
                   help="with --coprocessor: augment again before every M-th generated token (0 = prompt's end only)")
    p.add_argument("--draft-model", default=None, metavar="DIR", help="exported drafter for --speculative draft")
    p.add_argument("--draft-tree", choices=("chain", "static", "dynamic"), default="chain",
                   help="--speculative draft: a chain of sampled drafts, or a static / dynamic (DySpec) tree of the "
                        "drafter's top tokens verified in one pass")
    p.add_argument("--decode", choices=("ar", "masked", "cascade"), default="ar",
                   help="ar: token by token; masked: MaskGIT parallel decoding of the whole segment, for a model "
                        "trained with the masked or hybrid objective; cascade: BAMM's causal draft, then MaskGIT "
                        "refinement of its least sure tokens, for a hybrid-trained model (docs/generation.md)")
    p.add_argument("--steps", type=int, default=8,
                   help="with --decode masked or cascade: bidirectional passes (MaskGIT steps; at most the number "
                        "of positions regenerated)")
    p.add_argument("--recap", action="store_true",
                   help="with --decode masked: ReCAP, a full pass every second step and cheap context-reusing ones")
    p.add_argument("--edit", default=None, metavar="INPUT",
                   help="with --decode masked: regenerate the --edit-mask positions of this --to sample and keep "
                        "the rest; a file of that modality (as --image etc. read it) or a token file (.json list "
                        "or .npy array of the modality's tokenizer-local ids)")
    p.add_argument("--edit-mask", default=None, metavar="SPEC",
                   help="with --edit: token positions to regenerate, e.g. 0:16 or 3,5,40:48 or -8: (half-open "
                        "spans; negative counts from the end)")
    p.add_argument("--refine", type=float, default=0.3,
                   help="with --decode cascade: share of the draft's tokens (the least sure) to regenerate")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
