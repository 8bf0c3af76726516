"""Does an exported demo model follow its captions? Two quick measurements (docs/training.md,
"Why the demo model did not follow prompts"); `mmfm eval prompts` is the full scorer set.

1. caption gain (teacher forced, no sampling): for each held-out token sample <caption> <M tokens>,
   the mean cross-entropy of M's tokens given its own caption and given another sample's caption
   of the same modality. gain = wrong - true (nats/token; 0 = the caption is ignored) and the share
   of samples whose own caption is the better one (0.5 = ignored).
2. generation: "a handwritten digit k" (k = 0..9, n each) and single-object scene prompts
   ("a large red circle at the center on a black background"), images generated with mmfm.generate,
   labelled by logistic regressions fitted on the corpus' own images (the training split, through
   the tokenizer's prepare); each scorer's accuracy on held-out real images through the image
   tokenizer (encode + decode) is its ceiling.

    python tools/promptfollow_probe.py --export runs/demo/export --corpus runs/demo/corpus \
        --tokens runs/demo/tokens [--cfg 1 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np
import torch

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")


def caption_gain(model, vocab, eval_shards: str) -> dict:
    from mmfm.data.shards import expand_shards
    from mmfm.data.tario import iter_shard

    bt, et = vocab.begin_id("text"), vocab.end_id("text")
    by_mod: dict[str, list] = {}
    for url in expand_shards(eval_shards):
        for _, f in iter_shard(url, lambda *a, **k: None):
            import io
            ids = np.load(io.BytesIO(f["npy"])).astype(np.int64)
            if len(ids) < 4 or ids[1] != bt:
                continue
            e = int(np.flatnonzero(ids == et)[0])
            body = ids[e + 1:]
            mod = vocab.modality_of(int(body[0])) if len(body) else "text"
            begin = [m for m in vocab.ranges if vocab.begin_id(m) == int(body[0])] if len(body) else []
            if not begin or begin[0] == "text":
                continue
            by_mod.setdefault(begin[0], []).append((ids[1:e + 1], body))
    out = {}
    model.eval()
    for m, items in sorted(by_mod.items()):
        if len(items) < 2:
            continue
        true_l, wrong_l = [], []
        for i, (cap, body) in enumerate(items):
            other = items[(i + 1) % len(items)][0]
            ces = []
            for c in (cap, other):
                seq = torch.tensor(np.concatenate([[vocab.bos_id], c, body]))[None]
                with torch.no_grad():
                    logits = model(seq)
                    logits = logits[0] if isinstance(logits, tuple) else logits
                n = len(body) - 1            # predict body[1:] (after <begin_M>) through <end_M>
                pred = logits[0, -n - 1:-1].float()
                ces.append(float(torch.nn.functional.cross_entropy(pred, seq[0, -n:])))
            true_l.append(ces[0])
            wrong_l.append(ces[1])
        t, w = np.array(true_l), np.array(wrong_l)
        out[m] = {"n": len(items), "loss_true": float(t.mean()), "loss_wrong": float(w.mean()),
                  "gain": float((w - t).mean()), "true_better": float((t < w).mean())}
    return out


def _images(corpus: str, tok, pattern: str, label_fn):
    from mmfm.tokenizers.data import is_held_out, read_samples

    train, held = ([], []), ([], [])
    for s in read_samples(os.path.join(corpus, "image-*.tar"), "image", "all"):
        cap = s.get("txt") or ""
        if not re.fullmatch(pattern, cap) or " and " in cap:
            continue
        y = label_fn(cap)
        x = tok.prepare(s)
        dst = held if is_held_out(s["__key__"], 0.1) else train
        dst[0].append(x)
        dst[1].append(y)
    return train, held


def colour_histogram(imgs: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, P] share of pixels nearest each palette colour of the scenes
    (raw pixels hide a small object's colour under the background's)."""
    from mmfm.data.demo_corpus.images import COLORS

    pal = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255          # [P, 3]
    px = imgs.permute(0, 2, 3, 1).reshape(len(imgs), -1, 3)                       # [B, N, 3]
    near = torch.cdist(px, pal[None].expand(len(imgs), -1, -1)).argmin(-1)         # [B, N]
    return torch.nn.functional.one_hot(near, len(pal)).float().mean(1)


def _features(imgs, name: str):
    x = torch.stack(list(imgs)) if not isinstance(imgs, torch.Tensor) else imgs
    return colour_histogram(x) if name == "scene_colour" else x


class SecondColour:
    """The scene object's colour: the palette colour covering most pixels after the background's."""

    def predict(self, X):
        from mmfm.data.demo_corpus.images import COLORS

        names = np.array(list(COLORS))
        order = np.argsort(-X, axis=1)
        return names[order[:, 1]]


def _fit(train, name: str = ""):
    if name == "scene_colour":
        return SecondColour()

    from sklearn.linear_model import LogisticRegression

    X = torch.stack(list(train[0])).reshape(len(train[0]), -1).numpy()
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(X, train[1])
    return clf


def _score(clf, imgs: torch.Tensor, labels) -> float:
    pred = clf.predict(imgs.reshape(len(imgs), -1).numpy())
    return float(np.mean(pred == np.asarray(labels)))


def generation(export: str, corpus: str, n: int, cfg_scales, seed: int = 0) -> dict:
    from mmfm.generate import Bundle, generate

    bundle = Bundle.load(export)
    tok = bundle.tokenizers["image"]
    res = {}
    tasks = {
        "digit": (r"a handwritten digit \d", lambda c: c[-1],
                  [f"a handwritten digit {k}" for k in range(10) for _ in range(n)]),
        "scene_colour": (r"a (large|small) \w+ \w+ at the [\w ]+ on an? \w+ background",
                         lambda c: c.split()[2],
                         [f"a large {c} {s} at the center on a {bg} background"
                          for i, c in enumerate(COLOURS[:4]) for s in ("circle", "square")
                          for bg in (["black", "white"] if c not in ("black", "white") else ["green"])][:n * 2]),
    }
    for name, (pattern, label_fn, prompts) in tasks.items():
        train, held = _images(corpus, tok, pattern, label_fn)
        clf = _fit((_features(train[0], name), train[1]), name)
        with torch.no_grad():
            recon = tok.decode(tok.encode_batch(held[0])) if held[0] else torch.zeros(0)
        ceiling = _score(clf, _features(recon, name), held[1]) if len(recon) else float("nan")
        labels = [label_fn(p) for p in prompts]
        for cfg in cfg_scales:
            t0 = time.perf_counter()
            out = generate(bundle, prompts, "image", temperature=1.0, top_k=0, cfg_scale=float(cfg), seed=seed)
            imgs = torch.stack([s.value for s in out])
            acc = _score(clf, _features(imgs, name), labels)
            res[f"{name}@cfg{cfg:g}"] = {"accuracy": acc, "n": len(prompts), "ceiling": ceiling,
                                          "chance": 1 / len(set(train[1])), "seconds": round(time.perf_counter() - t0, 1)}
            print(f"  {name:<13} cfg {cfg:<4g} {acc:.2f} (n {len(prompts)}, ceiling {ceiling:.2f}, "
                  f"chance {1 / len(set(train[1])):.2f})", file=sys.stderr, flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--tokens", required=True, help="token folder with eval-*.tar and vocab.json")
    p.add_argument("--n", type=int, default=5, help="digit prompts per class")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0])
    p.add_argument("--json", default="")
    p.add_argument("--skip-gen", action="store_true")
    a = p.parse_args(argv)
    from mmfm.export import load
    from mmfm.vocab import Vocab

    torch.manual_seed(0)
    vocab = Vocab.load(os.path.join(a.tokens, "vocab.json"))
    model = load(a.export)
    gain = caption_gain(model, vocab, os.path.join(a.tokens, "eval-*.tar"))
    for m, r in gain.items():
        print(f"  caption gain {m:<8} {r['gain']:+.3f} nats/token, own caption better in {r['true_better']:.2f} "
              f"(n {r['n']}, loss {r['loss_true']:.3f} vs {r['loss_wrong']:.3f})", file=sys.stderr, flush=True)
    res = {"caption_gain": gain}
    if not a.skip_gen:
        res["generation"] = generation(a.export, a.corpus, a.n, a.cfg)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
