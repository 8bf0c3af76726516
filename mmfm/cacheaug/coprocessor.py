"""The coprocessor of "Deliberation in Latent Space via Differentiable Cache Augmentation".

A copy of the decoder's blocks (same ModelConfig, weights initialised from the decoder) plus N
trainable soft tokens. Its layer l attends to the decoder's layer-l keys/values of the prefix and
then to its own soft tokens (causally); its final-norm hidden states at the N soft-token positions
are the latent embeddings. The frozen decoder runs those latents as `inputs_embeds`, which appends
their keys/values to its own cache.

Where the latents go (one convention for training, eval and generation): the augmented cache is
the cache of everything before the token about to be fed. In a decode loop that is the natural
point: the cache holds x_0 .. x_{p-1} and x_p waits to be fed; augment appends the latents, then
x_p is fed as usual and its logits predict x_{p+1}. Every scored prediction starts from a real
token's embedding, as in the decoder's own training, and the latents are extra context it attends to.

Positions: the real tokens keep their own positions (x_p is fed at position p, exactly as without
augmentation) and all N latents (and the coprocessor's soft tokens) sit at position p, the
augmentation point. So x_{p+k} sees x_{p-1} at distance k + 1, as the decoder was trained, and the
latents at distance k. (Continuing the positions after the latents was tried first: it moves
x_{p-1} N + 1 positions away from x_p, the frozen decoder's strongest cue, and on the demo model
the augmented perplexity stayed above the plain one after 200 steps.) The price: a decode loop
must pass positions = cache.lengths - (latent slots so far) instead of the default cache.lengths
(mmfm/cacheaug/generate.py does). At a prompt's end: prefill all but the prompt's last token, augment,
feed the last token at position len(prompt) - 1.

The coprocessor has no vocabulary: its embedding table is a single frozen row (never read, since
its inputs are the soft tokens) and it has no output head, so it stores only blocks, final norm
and soft tokens.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch
import torch.nn as nn

from mmfm.models import ModelConfig, Transformer

WEIGHTS = "coprocessor.safetensors"
CONFIG = "coprocessor.json"
FORMAT_VERSION = 1


class Coprocessor(nn.Module):
    def __init__(self, decoder_cfg: ModelConfig, num_latents: int, latent_group: int = 0):
        super().__init__()
        if num_latents < 0:
            raise ValueError(f"Coprocessor: num_latents must be >= 0, got {num_latents}")
        if decoder_cfg.groups > 1 and not 0 <= latent_group < decoder_cfg.groups:
            raise ValueError(f"Coprocessor: latent_group must lie in [0, {decoder_cfg.groups}), got {latent_group}")
        self.decoder_cfg = dataclasses.replace(decoder_cfg)
        self.num_latents = num_latents
        self.latent_group = latent_group
        self.body = Transformer(dataclasses.replace(decoder_cfg, vocab_size=1, tie_embeddings=True))
        self.body.embed_tokens.weight.requires_grad_(False)
        self.soft = nn.Parameter(torch.zeros(num_latents, decoder_cfg.dim))

    @classmethod
    def from_decoder(cls, decoder: Transformer, num_latents: int, latent_group: int = 0, seed: int = 0) -> "Coprocessor":
        """Blocks and final norm copied from the decoder; soft tokens start as the input embeddings of
        random vocabulary rows, so the coprocessor's first layer sees inputs on the scale it was trained on."""
        c = cls(decoder.cfg, num_latents, latent_group)
        state = {k: v for k, v in decoder.state_dict().items() if not k.startswith(("embed_tokens.", "lm_head."))}
        missing, unexpected = c.body.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not m.startswith("embed_tokens.")]:
            raise ValueError(f"Coprocessor.from_decoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, decoder.cfg.vocab_size, (num_latents,), generator=g)
        with torch.no_grad():
            c.soft.copy_(decoder.embed_tokens.weight.detach()[rows].to(c.soft))
        return c.to(next(decoder.parameters()).device)

    def group_ids(self, B: int, L: int, device) -> torch.Tensor | None:
        if self.decoder_cfg.groups == 1:
            return None
        return torch.full((B, L), self.latent_group, dtype=torch.long, device=device)

    def forward(self, cache, positions: torch.Tensor) -> torch.Tensor:
        """Latents [B, N, dim] for the prefix in `cache` (a KVCache or PrefixCache of the decoder);
        positions [B, N] of the soft tokens.
        The soft tokens' own keys/values are appended to `cache` (the caller drops them)."""
        B, N = cache.batch, self.num_latents
        x = self.soft.unsqueeze(0).expand(B, N, self.soft.shape[1])
        return self.body(None, self.group_ids(B, N, x.device), positions=positions, cache=cache,
                         inputs_embeds=x, return_hidden=True)


def _check_pair(decoder: Transformer, coprocessor: Coprocessor) -> None:
    a, b = decoder.cfg, coprocessor.decoder_cfg
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "rope_theta", "modality_sparse", "num_modalities")
    diff = [k for k in keys if getattr(a, k) != getattr(b, k)]
    if diff:
        raise ValueError(f"augment: the coprocessor was built for another decoder ({diff[0]}: "
                         f"{getattr(b, diff[0])} vs the decoder's {getattr(a, diff[0])})")


@torch.no_grad()
def augment(decoder: Transformer, coprocessor: Coprocessor | None, cache, positions: torch.Tensor | None = None) -> int:
    """Append the coprocessor's N latents to every row of `cache` (a KVCache holding the decoder's
    prefix, ragged lengths allowed) at the row's current length; returns N (0, and the cache
    untouched, without a coprocessor). Then feed the pending token as usual, at its own position.

    positions [B]: the position of each row's pending token, where the latents sit (default
    cache.lengths, right when the cache holds no earlier latents; otherwise cache.lengths minus the
    latent slots already in the row). The cache needs N free slots per row: the coprocessor writes
    its soft tokens' keys/values there first; they are then dropped and the decoder's keys/values
    of the latents take their place, so augmenting costs no extra cache memory."""
    if coprocessor is None or coprocessor.num_latents == 0:
        return 0
    _check_pair(decoder, coprocessor)
    N = coprocessor.num_latents
    start = cache.lengths.clone()
    if bool((start + N > cache.capacity).any()):
        raise ValueError(f"augment: the cache needs {N} free slots per row for the latents (capacity "
                         f"{cache.capacity}, lengths up to {int(start.max())})")
    at = start if positions is None else torch.as_tensor(positions, device=start.device).long().reshape(-1)
    if at.shape != start.shape:
        raise ValueError(f"augment: positions must hold one position per row ({start.numel()}), got {tuple(at.shape)}")
    pos = at[:, None].expand(-1, N)
    latents = coprocessor(cache, pos)
    cache.truncate(start)
    decoder(None, coprocessor.group_ids(cache.batch, N, latents.device), positions=pos, cache=cache,
            inputs_embeds=latents.to(next(decoder.parameters()).dtype), return_hidden=True)
    return N


class PrefixCache:
    """A differentiable stand-in for KVCache in training: the decoder's prefix keys/values
    (k, v [n_layers, R, Hkv, T, D], no grad; row r's prefix is its first lengths[r] slots) followed
    by whatever later forwards append, joined with torch.cat so gradients flow into the appended
    keys/values. Implements the part of the KVCache protocol Transformer.forward uses (batch,
    lengths, write, read, attention_mask, advance); callers always pass positions, because the
    slots here are not positions (the prefix is padded to T).

    Why not KVCache itself: its writes are in-place copies into a preallocated buffer through the
    cache ops, which may be compiled kernels without autograd."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor):
        self.k_past, self.v_past = k, v
        T = k.shape[3]
        self.past_valid = torch.arange(T, device=k.device)[None, :] < lengths.to(k.device)[:, None]  # [R, T]
        n_layers = k.shape[0]
        self.new_k: list = [None] * n_layers
        self.new_v: list = [None] * n_layers
        self.n_new = 0
        self.lengths = torch.full((k.shape[1],), T, dtype=torch.long, device=k.device)

    @property
    def batch(self) -> int:
        return self.k_past.shape[1]

    def begin(self, L: int, counts) -> int:
        if counts is not None:
            raise ValueError("PrefixCache: ragged counts are not supported")
        return self.k_past.shape[3] + self.n_new + L

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        nk, nv = self.new_k[layer], self.new_v[layer]
        self.new_k[layer] = k if nk is None else torch.cat([nk, k], dim=2)
        self.new_v[layer] = v if nv is None else torch.cat([nv, v], dim=2)

    def read(self, layer: int, upto: int):
        return (torch.cat([self.k_past[layer], self.new_k[layer]], dim=2),
                torch.cat([self.v_past[layer], self.new_v[layer]], dim=2))

    def attention_mask(self, L: int, upto: int, tree_mask=None) -> torch.Tensor:
        if tree_mask is not None:
            raise ValueError("PrefixCache: tree masks are not supported")
        R, dev = self.batch, self.k_past.device
        past = self.past_valid[:, None, :].expand(R, L, self.past_valid.shape[1])
        earlier = torch.ones(R, L, self.n_new, dtype=torch.bool, device=dev)
        causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()[None].expand(R, L, L)
        return torch.cat([past, earlier, causal], dim=2).unsqueeze(1)

    def advance(self, L: int, counts) -> None:
        self.n_new += L
        self.lengths = self.lengths + L


def load_decoder(folder: str, what: str = "--decoder") -> Transformer:
    """The frozen decoder from an export folder, with an error that names the argument."""
    from mmfm.models.io import load

    if not os.path.exists(os.path.join(folder, "mmfm_model.json")):
        raise FileNotFoundError(f"{what}: {folder} is not an mmfm export folder (no mmfm_model.json; "
                                "make one with `mmfm export RUN --out DIR`)")
    return load(folder)


def weights_hash(module: nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_coprocessor(coprocessor: Coprocessor, folder: str, extra: dict | None = None) -> str:
    """folder/coprocessor.safetensors (soft tokens, blocks, final norm) + folder/coprocessor.json."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().float().contiguous().clone() for k, v in coprocessor.state_dict().items()
             if not k.startswith("body.embed_tokens.")}
    save_file(state, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
    meta = {"format_version": FORMAT_VERSION, "num_latents": coprocessor.num_latents,
            "latent_group": coprocessor.latent_group, "decoder_model": dataclasses.asdict(coprocessor.decoder_cfg),
            "positions": "cache of x_0..x_{p-1}, then N latents all at position p, then x_p fed at position p",
            **(extra or {})}
    tmp = os.path.join(folder, CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(folder, CONFIG))
    return folder


def load_coprocessor(folder: str, decoder: Transformer | None = None) -> Coprocessor:
    """The coprocessor saved in `folder` (eval mode, fp32; on the decoder's device when one is given).
    With `decoder`, also checks that the coprocessor was built for that decoder's shape."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(folder, CONFIG)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"load_coprocessor: {folder} has no {CONFIG} (train one with `mmfm cacheaug train`)")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"load_coprocessor: {cfg_path}: format_version {meta.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION}")
    c = Coprocessor(ModelConfig(**meta["decoder_model"]), int(meta["num_latents"]), int(meta.get("latent_group", 0)))
    state = load_file(os.path.join(folder, WEIGHTS))
    missing, unexpected = c.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.startswith("body.embed_tokens.")]:
        raise ValueError(f"load_coprocessor: {folder}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    c.meta = meta
    if decoder is not None:
        _check_pair(decoder, c)
        c = c.to(next(decoder.parameters()).device)
    return c.eval()
