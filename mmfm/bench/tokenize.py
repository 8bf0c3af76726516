"""Pre-tokenization throughput: samples/s per modality of `mmfm tokenize` at 1 and 2 workers.

    mmfm bench tokenize [--quick] [--json PATH] [--tokenizers DIR] [--workers 1,2] [--samples N]

Per modality, N synthetic samples (mmfm.data.synthetic; video as MP4) in 8 shards go through
mmfm.tokenizers.pretokenize.run_tokenize into a fresh folder, once per worker count. Without
--tokenizers, small untrained tokenizers are built (the speed of a forward pass does not depend
on the weights). The time includes starting the worker processes, as a real run's does.
"""
from __future__ import annotations

import os
import sys
import tempfile

from mmfm.bench.common import base_parser, machine, parse_args, record, report

MODALITIES = ("text", "image", "audio", "video")


def _small_tokenizers(folder: str) -> str:
    import numpy as np

    from mmfm.tokenizers import build_tokenizer
    from mmfm.tokenizers.audio import AudioConfig
    from mmfm.tokenizers.image import ImageConvConfig
    from mmfm.tokenizers.text import TextConfig, TextTokenizer
    from mmfm.tokenizers.video import VideoConfig

    toks = {"image": build_tokenizer("image_conv", ImageConvConfig(image_size=32)),
            "audio": build_tokenizer("audio_codec", AudioConfig()),
            "video": build_tokenizer("video", VideoConfig(frames=5))}
    words = ["alpha", "beta", "gamma", "delta", "field", "wave", "shape", "token", "red", "blue"]
    rng = np.random.default_rng(0)
    toks["text"] = TextTokenizer(TextConfig(vocab_size=300)).fit([" ".join(rng.choice(words, 12)) for _ in range(300)])
    for m, t in toks.items():
        t.save(os.path.join(folder, m))
    return folder


def _raw(modality: str, n: int, folder: str) -> str:
    from mmfm.data.synthetic import synthetic_sample
    from mmfm.data.writer import SampleShardWriter

    out = os.path.join(folder, f"raw-{modality}")
    with SampleShardWriter(out, prefix=modality, shard_size=max(1, n // 8)) as w:
        for i in range(n):
            s = synthetic_sample(modality, i, {"text": 120, "image": 64, "audio": 320, "video": 32}[modality])
            if modality == "video":  # stored as users' video is: an MP4, decoded by the tokenizer
                frames = s.pop("npz")["frames"]
                s["mp4"] = frames.repeat(2, axis=0)[:9] if len(frames) < 9 else frames
                s["json"]["num_frames"] = len(s["mp4"])
            w.write(s)
    return out


def main(argv=None) -> int:
    p = base_parser("tokenize", __doc__.splitlines()[0])
    p.add_argument("--tokenizers", default=None, help="saved tokenizers (default: small untrained ones)")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--samples", type=int, default=None, help="samples per modality (default 256; 32 with --quick)")
    p.add_argument("--modalities", default=",".join(MODALITIES))
    # tokenizer workers run on the CPU; their quantizers call the compiled quant ops
    args = parse_args(p, argv, cpu_only="supported (mmfm tokenize runs its workers on the CPU)")
    if args is None:
        return 2
    from mmfm.tokenizers.pretokenize import run_tokenize

    n = args.samples or (32 if args.quick else 256)
    records = []
    print(f"# {machine()}; {n} samples per modality", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        toks = args.tokenizers or _small_tokenizers(os.path.join(tmp, "tokenizers"))
        for m in args.modalities.split(","):
            raw = _raw(m, n, tmp)
            for w in (int(x) for x in args.workers.split(",")):
                r = run_tokenize(toks, raw, os.path.join(tmp, f"tok-{m}-{w}"), workers=w, progress=False)
                got = r["modalities"][m]["samples"]
                if got != n:
                    print(f"mmfm bench tokenize: {got} of {n} {m} samples tokenized ({r['skip_reasons']})", file=sys.stderr)
                    return 1
                records.append(record("tokenize", {"modality": m, "samples": n, "workers": w}, "mmfm",
                                      samples_per_s=r["samples_per_s"], seconds=r["seconds"]))
    return report(records, args.json, figures=("samples_per_s", "seconds"))


if __name__ == "__main__":
    sys.exit(main())
