"""Reader throughput per modality: samples/s and MB/s through the full pipeline with 2 workers.

    mmfm bench data [--quick] [--json PATH] [--workers 2] [--samples N] [--formats mp4,flac,...]

For each modality it writes N synthetic samples of realistic size into shards (temp folder),
then times one full epoch of ShardLoader(ShardDataset(...)) with decoding and schema checks
(impl `mmfm`), and of plain webdataset with the same decoder but no checks and no state
(impl `webdataset`, the anchor). MB is shard bytes read. The figure is the median of
--repeats epochs; each epoch includes starting the workers, as a training epoch does.
Then, per input format (--formats; mmfm/bench/data_formats.py), the decode throughput of mmfm's
decoder against the plain library call (PyAV, soundfile, h5py, trimesh, Pillow) on the same files.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from mmfm.bench.common import base_parser, machine, parse_args, record, report

MODALITIES = ("text", "image", "audio", "video", "shape3d", "physics")
SIZES = {"text": 120, "image": 128, "audio": 320, "video": 32, "shape3d": 512, "physics": 32}  # synthetic_sample size


def _identity(x):
    return x


def _plain_webdataset_epoch(urls, workers: int, batch: int) -> int:
    import webdataset as wds
    from torch.utils.data import DataLoader

    from mmfm.data.codecs import decode_field

    def decode(sample):
        return {k: (decode_field(k, v) if not k.startswith("__") else v) for k, v in sample.items()}

    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False).map(decode)
    ds = ds.batched(batch, collation_fn=list)
    n = 0
    for b in DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=_identity):
        n += len(b)
    return n


def _mmfm_epoch(folder, workers: int, batch: int) -> int:
    from mmfm.data.dataset import ShardDataset, ShardLoader

    loader = ShardLoader(ShardDataset(folder, batch_size=batch, shuffle_shards=False), num_workers=workers)
    return sum(len(b["__key__"]) for b in loader)


def main(argv=None) -> int:
    p = base_parser("data", __doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples", type=int, default=None, help="samples per modality (default 400; 40 with --quick)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--modalities", default=",".join(MODALITIES))
    p.add_argument("--formats", default="mp4,flac,mp3,hdf5,glb,webp",
                   help="input formats whose decode is timed against the plain library call ('' for none)")
    # the readers and decoders run on the CPU; no compiled op is timed
    args = parse_args(p, argv, cpu_only="meaningful (shard reading and decoding run on the CPU)", compiled=False)
    if args is None:
        return 2
    from mmfm.data.synthetic import synthetic_sample
    from mmfm.data.writer import SampleShardWriter

    n = args.samples or (40 if args.quick else 400)
    repeats = 1 if args.quick else args.repeats
    records = []
    print(f"# {machine()}; {n} samples per modality, {args.workers} workers, batch {args.batch}, "
          f"median of {repeats}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.modalities.split(","):
            folder = os.path.join(tmp, m)
            with SampleShardWriter(folder, prefix=m, shard_size=max(1, n // 8), verify_decode=False) as w:
                for i in range(n):
                    w.write(synthetic_sample(m, i, SIZES[m]))
            urls = [os.path.join(folder, s["name"]) for s in w.manifest["shards"]]
            mb = w.manifest["bytes"] / 1e6
            case = {"modality": m, "samples": n, "workers": args.workers, "batch": args.batch,
                    "kb_per_sample": round(w.manifest["bytes"] / n / 1e3, 1)}
            for impl, run in (("mmfm", lambda: _mmfm_epoch(folder, args.workers, args.batch)),
                              ("webdataset", lambda: _plain_webdataset_epoch(urls, args.workers, args.batch))):
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    got = run()
                    times.append(time.perf_counter() - t0)
                    if got != n:
                        print(f"mmfm bench data: {impl} read {got} of {n} {m} samples", file=sys.stderr)
                        return 1
                t = statistics.median(times)
                records.append(record("data", case, impl, samples_per_s=round(n / t, 1), mb_per_s=round(mb / t, 2),
                                      ms=round(t * 1e3, 1)))
        formats = [f for f in args.formats.split(",") if f]
        if formats:
            from mmfm.bench.data_formats import format_records

            records += format_records(formats, 10 if args.quick else 50, repeats, tmp)
    return report(records, args.json, figures=("samples_per_s", "files_per_s", "mb_per_s", "ms"))


if __name__ == "__main__":
    sys.exit(main())
