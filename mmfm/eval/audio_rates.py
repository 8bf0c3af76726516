"""The unified model's held-out audio loss per second of audio, by RVQ level (issue 19 item 6).

The frame-rate comparison (docs/benchmarks.md, "Audio at lower token rates") trains the demo model
on audio + text token shards made with each codec (50 / 25 / 12.5 frames/s, all 200 tokens/s at
1600 bits/s) and compares held-out audio loss in bits per second of audio:

    bits/s = nats per audio token x audio tokens per second / ln 2

`pretrain`'s eval gives the nats per audio token over all levels; this module also splits it by
residual level (a frame-major segment's k-th audio token is level k mod num_levels), which is
where a lower frame rate moves the work: fewer, deeper frames.

    python -m mmfm.eval.audio_rates --run RUN_DIR --tokens 'TOKENS/eval-*.tar' \
        --levels 16 --token-rate 200
"""
from __future__ import annotations

import argparse
import glob
import json
import math


def bits_per_second(nats_per_token: float, tokens_per_s: float) -> float:
    return nats_per_token * tokens_per_s / math.log(2)


def audio_loss_by_level(run_dir: str, token_shards: str, levels: int) -> dict:
    """{"nats": mean over codec-token targets, "by_level": [mean nats of level l], "tokens": n} for
    the pretrain run's last checkpoint on every audio sample of `token_shards`, one sample a row
    (as packed with pack: whole and a document mask, a sample sees only itself)."""
    import torch

    from mmfm.models import build_model
    from mmfm.objectives import ObjectiveConfig, build_objective
    from mmfm.train.checkpoint import consolidate
    from mmfm.vocab import Vocab

    if levels < 1:
        raise ValueError(f"--levels: expected the codec's RVQ levels per frame (>= 1), got {levels}")
    state, run_cfg = consolidate(run_dir)
    from mmfm.models.config import ModelConfig
    from mmfm.typed_config import from_dict

    model_cfg = from_dict(ModelConfig, run_cfg["model"], f"{run_dir}/config.json: model")
    vocab = Vocab.load(run_cfg["data"]["vocab"])
    model = build_model(model_cfg)
    model.load_state_dict(state)
    model.eval()
    table = vocab.modality_table()
    audio = vocab.ranges["audio"]
    ar = build_objective(ObjectiveConfig(kind="ar"), vocab)
    paths = sorted(glob.glob(token_shards))
    if not paths:
        raise FileNotFoundError(f"--tokens {token_shards!r}: no token shards match")
    sums, counts = torch.zeros(levels, dtype=torch.float64), torch.zeros(levels, dtype=torch.float64)
    for arr in _token_arrays(paths):
        ids = torch.as_tensor(arr, dtype=torch.long)[None]
        mods = table[ids]
        if not bool(((ids >= audio.start) & (ids < audio.start + audio.size)).any()):
            continue
        prep = ar.prepare(ids, mods, torch.ones_like(ids, dtype=torch.bool))
        w = (prep.labels != -100).float()
        with torch.no_grad():
            _, ce = model(prep.input_ids, prep.modality_ids, prep.attn_mask, labels=prep.labels, label_weights=w)
        ce = ce.reshape(-1).double()
        # codec tokens only: <begin_audio> / <end_audio> also count as audio in the model's own eval
        # (eval_loss_audio), but they are not audio content and would shift the level count
        lab = prep.labels.reshape(-1)
        is_audio = (lab >= audio.start) & (lab < audio.start + audio.size)
        pos = is_audio.nonzero().reshape(-1)
        # frame-major: the k-th audio target of the segment is level k mod levels
        lvl = torch.arange(len(pos)) % levels
        sums.index_add_(0, lvl, ce[pos])
        counts.index_add_(0, lvl, torch.ones(len(pos), dtype=torch.float64))
    if not counts.sum():
        raise ValueError(f"--tokens {token_shards!r}: no audio samples")
    return {"nats": float(sums.sum() / counts.sum()), "by_level": (sums / counts).tolist(),
            "tokens": int(counts.sum())}


def _token_arrays(paths: list[str]):
    """Each sample's id array from token shards (one `<key>.npy` member a sample)."""
    import io
    import tarfile

    import numpy as np

    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".npy"):
                    yield np.load(io.BytesIO(tar.extractfile(m).read()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a pretrain output folder (config.json, checkpoints/)")
    p.add_argument("--tokens", required=True, help="held-out token shards (glob)")
    p.add_argument("--levels", type=int, required=True, help="the codec's RVQ levels per frame")
    p.add_argument("--token-rate", type=float, required=True, help="the codec's audio tokens per second")
    p.add_argument("--json", default="", help="also write the result here")
    a = p.parse_args(argv)
    r = audio_loss_by_level(a.run, a.tokens, a.levels)
    r["bits_per_s"] = bits_per_second(r["nats"], a.token_rate)
    # a level is token_rate / levels tokens per second
    r["bits_per_s_by_level"] = [bits_per_second(x, a.token_rate / a.levels) for x in r["by_level"]]
    print(json.dumps(r, indent=1))
    if a.json:
        from mmfm.jsonio import write_json

        write_json(a.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
