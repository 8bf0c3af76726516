"""The `mmfm data ...` subcommands: their arguments, and dispatch to the module that does the work.

cli.py calls add_data_parser() and run_data(); each subcommand is `main(args) -> int` in its
own module (build.py, verify.py, ...), imported only when it runs.
"""
from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = {}  # name -> module path, filled by add_data_parser


def add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="build, verify and select webdataset shards; the demo corpus")
    dsub = data.add_subparsers(dest="data_command", required=True)

    b = dsub.add_parser("build", help="your files, a JSONL/Parquet file or existing webdataset shards -> checked tar shards")
    b.add_argument("--modality", required=True, help="text, image, audio, video, shape3d or physics")
    b.add_argument("--src", required=True,
                   help="a folder (files grouped by name), a file, a .jsonl manifest, a .parquet file (text), or "
                        "webdataset shards: 'shards-{000000..000099}.tar', a glob ending in .tar, a folder of .tar, "
                        "a pipe: URL")
    b.add_argument("--out", required=True, help="folder for the shards")
    b.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    b.add_argument("--prefix", default=None, help="shard name prefix (default: the modality)")
    b.add_argument("--source", default=None, help="recorded in each sample's json (default: the input's path)")
    b.add_argument("--license", default="unknown", help="recorded in each sample's json (default: unknown)")
    b.add_argument("--map", default=None, metavar="ROLE=EXT[;EXT],...",
                   help="webdataset sources: the fields of each role, e.g. 'caption=txt,image=jpg;png;webp' "
                        "(roles: the modality or 'payload', caption, meta)")
    b.add_argument("--text-field", default="text", help="text from JSONL/Parquet: the field or column (default text)")
    b.add_argument("--num-points", type=int, default=2048, help="shape3d: surface points sampled per mesh (default 2048)")
    b.add_argument("--max-bad-fraction", type=float, default=0.5,
                   help="stop when more than this fraction of inputs fail to decode (default 0.5)")
    b.add_argument("--min-inputs", type=int, default=20, help="inputs seen before --max-bad-fraction applies (default 20)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    SUBCOMMANDS["build"] = "mmfm.data.build"

    v = dsub.add_parser("verify", help="decode and check every member of every shard; exit 1 if any is corrupt")
    v.add_argument("dir", help="a folder of shards, a brace pattern or a glob")
    v.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    SUBCOMMANDS["verify"] = "mmfm.data.verify"

    d = dsub.add_parser("demo", help="the six-modality demo corpus from bundled and synthesised sources (no network)")
    d.add_argument("--out", required=True, help="folder for the shards")
    d.add_argument("--scale", type=float, default=1.0, help="multiplies the sample counts (default 1)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    SUBCOMMANDS["demo"] = "mmfm.data.demo_corpus"

    s = dsub.add_parser("select", help="DSIR: pick the k raw samples most like the target (hashed n-grams, "
                                       "importance weights, Gumbel-top-k)")
    s.add_argument("--target", required=True, help="shards of the kind of data wanted (folder, pattern or glob)")
    s.add_argument("--raw", required=True, help="shards of the pool to select from")
    s.add_argument("--out", required=True, help="folder for the selected shards and select-report.json")
    s.add_argument("--k", type=int, required=True, help="how many samples to select")
    s.add_argument("--buckets", type=int, default=10_000, help="hash bins for unigram+bigram features")
    s.add_argument("--seed", type=int, default=0)
    SUBCOMMANDS["select"] = "mmfm.data.select"


def run_data(args: argparse.Namespace) -> int:
    module = importlib.import_module(SUBCOMMANDS[args.data_command])
    return int(module.main(args) or 0)
