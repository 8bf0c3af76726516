"""The continuous head's claim at small scale (Flow-Omni, xAR; mmfm/models/flow_head.py): predicting
the next image patch's continuous latent with a flow-matching head beside the token head
reconstructs better than decoding the predicted tokens, at the same sequence length.

Data: the demo corpus' images (digits, scenes), tokenized by a TokenBridge tokenizer (continuous
conv autoencoder + per-channel bins, `mmfm tokenizer train` on configs like
configs/tokenizers/image_tokenbridge_small.yaml): each image is 8 x 8 patches x C channel ids,
position-major, in the sequence <bos> <begin_image> ids <end_image> <eos>. Both arms read exactly
these sequences (same length, same decoder shape, same seed, steps and batches):

  discrete   the token loss only
  flow       the token loss + flow_weight x the flow head's loss, whose target at the position
             before each patch is that patch's pre-quantization latent (the autoencoder's float
             output, not the bin centres)

Held-out images, teacher-forced (each patch predicted from the true tokens before it):
  latent_mse      mean squared error of the predicted patch latent against the true float latent
  psnr            PSNR of the image decoded from the grid of predicted latents
for the discrete arm's tokens (argmax bins -> bin centres; and the expectation of the bin
centres under the predicted distribution, the MSE-optimal point estimate) and for the flow head
(one sample, and the mean of --flow-samples samples), beside the two ceilings: the autoencoder's
own reconstruction (true float latents) and the bins' (true tokens). The discrete arm's channel
c of a patch is predicted after the TRUE channels < c of that patch (teacher forcing within the
patch), information the flow head, which predicts the whole patch at once, does not get.

Training here is a plain AdamW loop over `joint_loss_and_report`, the loss mmfm pretrain's step
(mmfm/train/loop.py) computes, without the DeepSpeed engine: the comparison is of the heads, and
the Trainer path is tested in tests/test_flow_head.py.

    python -m mmfm.bench.flow --tokenizer DIR --shards 'corpus/image-*.tar' [--steps 600] [--json PATH]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F


def _images(tokenizer, shards: str, split: str, limit: int) -> torch.Tensor:
    from mmfm.tokenizers.data import prepare_all, read_samples

    return prepare_all(tokenizer, read_samples(shards, "image", split, 0.1, limit))


@torch.no_grad()
def encode(tb, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float latents [N, P, C], bin ids [N, P, C]) of images x, patches in raster order."""
    z = torch.cat([tb.autoencoder.latents(b) for b in x.split(128)])
    n, g, _, c = z.shape
    ids = tb.bins.encode(z).reshape(n, g * g, c)
    return z.reshape(n, g * g, c), ids


def sequences(vocab, ids: torch.Tensor, lat: torch.Tensor):
    """Token rows <bos> <begin_image> ids <end_image> <eos> and the flow targets at flow_positions."""
    from mmfm.models.flow_head import flow_positions

    n, p, c = ids.shape
    img = vocab.to_global("image", ids.reshape(n, -1))
    col = lambda v: torch.full((n, 1), v, dtype=img.dtype)  # noqa: E731
    b, e = vocab.begin_id("image"), vocab.end_id("image")
    rows = torch.cat([col(vocab.bos_id), col(b), img, col(e), col(vocab.eos_id)], 1)
    at = flow_positions(rows, b, e, c)
    latents = torch.zeros(n, rows.shape[1], c)
    latents[at] = lat.reshape(-1, c)
    return rows, at, latents


def train_arm(flow: bool, rows, at, latents, vocab, args) -> tuple[torch.nn.Module, list[float]]:
    from mmfm.models import ModelConfig, build_model
    from mmfm.objectives import ObjectiveConfig, build_objective, joint_loss_and_report

    C = latents.shape[-1]
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=4, ffn_hidden=int(args.dim * 8 / 3),
                      vocab_size=len(vocab), max_seq_len=rows.shape[1], flow_latent_dim=C if flow else 0,
                      flow_width=args.flow_width, flow_depth=args.flow_depth)
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    if flow:
        model.flow_head.set_scale(latents[at])
    obj = build_objective(ObjectiveConfig(kind="ar", flow_weight=args.flow_weight if flow else 0.0), vocab)
    table = vocab.modality_table()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    g = torch.Generator().manual_seed(args.seed)   # the same batches in both arms
    valid = torch.ones_like(rows, dtype=torch.bool)
    log = []
    for step in range(args.steps):
        idx = torch.randint(rows.shape[0], (args.batch,), generator=g)
        prep = obj.prepare(rows[idx], table[rows[idx]], valid[idx]).with_latents(latents[idx], at[idx])
        loss, sums, counts, fs, fc = joint_loss_and_report(model, prep, obj.weights, obj.cfg.flow_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            tok = float(sums.sum() / counts.sum())
            log.append(tok)
            print(f"[{'flow' if flow else 'discrete'}] step {step}: token loss {tok:.3f}"
                  + (f", flow {fs / fc:.3f}" if fc else ""), flush=True)
    return model.eval(), log


@torch.no_grad()
def predict(model, tb, vocab, rows, at, args) -> dict:
    """Teacher-forced predicted latents [N, P, C] of the held-out rows, by each estimator."""
    img = vocab.ranges["image"]
    n, C = rows.shape[0], tb.config.latent_dim
    centers = tb.bins.decode(torch.arange(tb.config.num_bins)[:, None].expand(-1, C)).float()   # [bins, C]
    out: dict[str, list] = {}
    g = torch.Generator().manual_seed(args.seed + 1)
    nll = []
    for r0 in range(0, n, 32):
        r = rows[r0:r0 + 32]
        h = model(r, return_hidden=True)
        logits = model.lm_head(h)[..., img.start:img.start + img.size].float()   # image ids only
        b = r.shape[0]
        # the image's ids sit at positions 2 .. 2 + P*C - 1, predicted by positions 1 .. P*C
        lg = logits[:, 1:1 + at.shape[1] - 4].reshape(b, -1, C, img.size)       # [b, P, C, bins]
        truth = r[:, 2:2 + at.shape[1] - 4].reshape(b, -1, C) - img.start
        nll.append(F.cross_entropy(lg.reshape(-1, img.size), truth.reshape(-1), reduction="sum"))
        ch = torch.arange(C)
        arg = lg.argmax(-1)
        out.setdefault("tokens_argmax", []).append(centers[arg, ch])
        out.setdefault("tokens_expected", []).append((lg.softmax(-1) * centers.T).sum(-1))
        if model.flow_head is not None:
            hs = h[at[r0:r0 + 32]]
            one = model.flow_head.sample(hs, args.euler_steps, generator=g)
            mean = torch.stack([model.flow_head.sample(hs, args.euler_steps, generator=g)
                                for _ in range(args.flow_samples)]).mean(0)
            out.setdefault("flow_sample", []).append(one.view(b, -1, C))
            out.setdefault("flow_mean", []).append(mean.view(b, -1, C))
    res = {k: torch.cat(v) for k, v in out.items()}
    res["_nll_bits_per_image"] = float(sum(nll) / n / math.log(2))
    return res


@torch.no_grad()
def scores(tb, x, lat_true, lat_pred) -> dict:
    g = tb.autoencoder.grid
    C = lat_true.shape[-1]
    dec = torch.cat([tb.autoencoder.decode_latents(z.reshape(-1, g, g, C)).clamp(0, 1) for z in lat_pred.split(128)])
    mse = F.mse_loss(dec, x, reduction="none").flatten(1).mean(1)
    return {"latent_mse": float(F.mse_loss(lat_pred, lat_true)),
            "psnr": float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmfm bench flow", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a trained image_tokenbridge tokenizer folder")
    p.add_argument("--shards", required=True, help="image shards (the demo corpus' image-*.tar)")
    p.add_argument("--train-images", type=int, default=3000)
    p.add_argument("--eval-images", type=int, default=256)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--flow-width", type=int, default=128)
    p.add_argument("--flow-depth", type=int, default=3)
    p.add_argument("--flow-weight", type=float, default=1.0)
    p.add_argument("--euler-steps", type=int, default=8)
    p.add_argument("--flow-samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--samples-png", default="", help="write a grid of images generated by the flow arm here")
    args = p.parse_args(argv)
    from mmfm.jsonio import write_json
    from mmfm.tokenizers.base import load_tokenizer
    from mmfm.vocab import Vocab

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    tb = load_tokenizer(args.tokenizer).eval()
    if type(tb).__name__ != "TokenBridgeTokenizer":
        print(f"--tokenizer: {args.tokenizer} holds a {type(tb).__name__}; expected an image_tokenbridge one",
              file=sys.stderr)
        return 2
    vocab = Vocab(8, {"image": tb.config.num_bins})
    t0 = time.time()
    x_tr = _images(tb, args.shards, "train", args.train_images)
    x_ev = _images(tb, args.shards, "eval", args.eval_images)
    lat_tr, ids_tr = encode(tb, x_tr)
    lat_ev, ids_ev = encode(tb, x_ev)
    rows_tr, at_tr, latents_tr = sequences(vocab, ids_tr, lat_tr)
    rows_ev, at_ev, _ = sequences(vocab, ids_ev, lat_ev)
    print(f"{len(x_tr)} train / {len(x_ev)} held-out images, {rows_tr.shape[1]} tokens per sequence "
          f"({lat_tr.shape[1]} patches x {lat_tr.shape[2]} channels)", flush=True)
    centers = tb.bins.decode(ids_ev.reshape(-1, tb.autoencoder.grid, tb.autoencoder.grid, ids_ev.shape[-1]))
    result = {"args": vars(args), "sequence_length": int(rows_tr.shape[1]),
              "ceiling": {"autoencoder": scores(tb, x_ev, lat_ev, lat_ev),
                          "bins": scores(tb, x_ev, lat_ev, centers.reshape(lat_ev.shape).float())}, "arms": {}}
    models = {}
    for arm in ("discrete", "flow"):
        model, log = train_arm(arm == "flow", rows_tr, at_tr, latents_tr, vocab, args)
        models[arm] = model
        pred = predict(model, tb, vocab, rows_ev, at_ev, args)
        entry = {"token_nll_bits_per_image": pred.pop("_nll_bits_per_image"), "train_token_loss": log,
                 "params": sum(q.numel() for q in model.parameters())}
        for k, v in pred.items():
            entry[k] = scores(tb, x_ev, lat_ev, v)
        result["arms"][arm] = entry
        print(arm, {k: v for k, v in entry.items() if k != "train_token_loss"}, flush=True)
    if args.samples_png:
        result["samples_png"] = _samples(models["flow"], tb, vocab, args)
    result["seconds"] = time.time() - t0
    if args.json:
        write_json(args.json, result)
    return 0


@torch.no_grad()
def _samples(model, tb, vocab, args, n: int = 16) -> str:
    """Images generated patch by patch by the flow head (re-quantized ids fed back), saved as a grid."""
    import numpy as np
    from PIL import Image

    from mmfm.models.flow_head import generate_patches

    C, g = tb.config.latent_dim, tb.autoencoder.grid

    def quantize(z):
        return vocab.to_global("image", tb.bins.encode(z.reshape(-1, 1, 1, C)).reshape(-1, C))

    prefix = torch.tensor([[vocab.bos_id, vocab.begin_id("image")]]).expand(n, 2)
    lats, _ = generate_patches(model, prefix, g * g, C, quantize, args.euler_steps,
                               generator=torch.Generator().manual_seed(args.seed))
    imgs = tb.autoencoder.decode_latents(lats.reshape(n, g, g, C)).clamp(0, 1)
    grid = imgs.reshape(2, n // 2, 3, 32, 32).permute(0, 3, 1, 4, 2).reshape(64, n // 2 * 32, 3)
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).resize((n // 2 * 96, 192), Image.NEAREST).save(
        args.samples_png)
    return args.samples_png


if __name__ == "__main__":
    raise SystemExit(main())
