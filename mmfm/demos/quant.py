"""`mmfm demo quant`: a VQ and an FSQ autoencoder trained on real handwritten digits.

Data: scikit-learn's bundled digits (1,797 real 8x8 scans, no download), 1,500 to train and
297 held out. Each image is encoded to 4 latent tokens, quantized, and decoded. The demo prints
held-out reconstruction error, code usage and perplexity per quantizer, and writes into --out:
metrics.jsonl (and TensorBoard events), reconstructions.png (held-out digits: originals, VQ,
FSQ) and each trained quantizer as safetensors.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mmfm.quantizers import FSQ, VectorQuantizer

TOKENS = 4  # latent tokens per image


class TokenAutoencoder(nn.Module):
    """64 pixels -> TOKENS latent vectors -> quantizer -> 64 pixels."""

    def __init__(self, quantizer: nn.Module, token_dim: int):
        super().__init__()
        self.token_dim = token_dim
        self.encoder = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, TOKENS * token_dim))
        self.decoder = nn.Sequential(nn.Linear(TOKENS * token_dim, 256), nn.GELU(), nn.Linear(256, 64))
        self.quantizer = quantizer

    def forward(self, x):
        z = self.encoder(x).view(x.shape[0], TOKENS, self.token_dim)
        q = self.quantizer(z)
        recon = torch.sigmoid(self.decoder(q.quantized.reshape(x.shape[0], -1)))
        return recon, q


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return x[perm[:1500]], x[perm[1500:]]


def train(name: str, model: TokenAutoencoder, train_x, steps: int, seed: int, log, writer) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(1, steps + 1), desc=f"train {name}", file=sys.stderr, leave=False)
    for step in bar:
        batch = train_x[torch.randint(0, train_x.shape[0], (128,), generator=g)]
        recon, q = model(batch)
        mse = torch.mean((recon - batch) ** 2)
        loss = mse + q.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps:
            row = {"quantizer": name, "step": step, "loss": loss.item(), "mse": mse.item(),
                   "usage": q.metrics["usage"].item(), "perplexity": q.metrics["perplexity"].item()}
            log.write(json.dumps(row) + "\n")
            for key in ("loss", "mse", "usage", "perplexity"):
                writer.add_scalar(f"{name}/{key}", row[key], step)
            bar.set_postfix(mse=f"{row['mse']:.4f}", usage=f"{row['usage']:.2f}")


@torch.no_grad()
def evaluate(model: TokenAutoencoder, x) -> dict:
    model.eval()
    recon, q = model(x)
    return {"mse": float(torch.mean((recon - x) ** 2)), "codes_used": int(q.indices.unique().numel()),
            "codebook_size": model.quantizer.codebook_size, "perplexity": float(q.metrics["perplexity"]),
            "recon": recon}


def save_reconstructions(path: str, rows: list[torch.Tensor], scale: int = 4) -> None:
    from PIL import Image

    n = rows[0].shape[0]
    grid = np.ones((len(rows) * 9 * scale, n * 9 * scale), dtype=np.uint8) * 255
    for r, imgs in enumerate(rows):
        for c in range(n):
            tile = (imgs[c].reshape(8, 8).clamp(0, 1).numpy() * 255).astype(np.uint8)
            tile = np.kron(255 - tile, np.ones((scale, scale), dtype=np.uint8))
            grid[r * 9 * scale:r * 9 * scale + 8 * scale, c * 9 * scale:c * 9 * scale + 8 * scale] = tile
    Image.fromarray(grid).save(path)


def main(args) -> int:
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    train_x, test_x = load_digits_split(args.seed)
    print(f"digits: {train_x.shape[0]} train, {test_x.shape[0]} held out, 64 pixels each; "
          f"{TOKENS} tokens per image", file=sys.stderr)
    models = {
        "vq": TokenAutoencoder(VectorQuantizer(dim=8, codebook_size=128, use_ema=True, decay=0.95,
                                               dead_threshold=0.5, seed=args.seed), token_dim=8),
        "fsq": TokenAutoencoder(FSQ(levels=[8, 5, 5, 5]), token_dim=4),
    }
    results = {}
    t0 = time.time()
    writer = SummaryWriter(os.path.join(args.out, "tensorboard"))
    with open(os.path.join(args.out, "metrics.jsonl"), "w") as log:
        for name, model in models.items():
            train(name, model, train_x, args.steps, args.seed, log, writer)
            results[name] = evaluate(model, test_x)
            model.quantizer.save_safetensors(os.path.join(args.out, f"{name}_quantizer.safetensors"))
    writer.close()
    save_reconstructions(os.path.join(args.out, "reconstructions.png"),
                         [test_x[:16]] + [results[n]["recon"][:16] for n in models])

    print(f"quantization demo: {args.steps} steps per autoencoder, {time.time() - t0:.1f} s")
    print(f"{'quantizer':<10} {'held-out MSE':>12} {'codes used':>16} {'usage':>7} {'perplexity':>11}")
    for name, r in results.items():
        print(f"{name:<10} {r['mse']:>12.4f} {r['codes_used']:>7} / {r['codebook_size']:<6} "
              f"{r['codes_used'] / r['codebook_size']:>7.1%} {r['perplexity']:>11.1f}")
    print(f"outputs in {args.out}: metrics.jsonl, tensorboard/, reconstructions.png "
          f"(rows: originals, {', '.join(models)}), *_quantizer.safetensors")
    return 0
