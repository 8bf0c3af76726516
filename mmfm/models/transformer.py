"""The decoder over the unified vocabulary: RMSNorm, rotary positions, SwiGLU, grouped-query
attention, and optional modality-aware sparsity (Mixture-of-Transformers).

Dense, the parameter names and arithmetic are those of Hugging Face's LlamaForCausalLM (rotary
with rotate_half, RMSNorm in fp32, SwiGLU as down(silu(gate(x)) * up(x))), so the adapter in
mmfm/models/hf.py is a renaming and transformers' logits equal ours.

Mixture-of-Transformers (cfg.modality_sparse): every non-embedding weight -- q/k/v/o projections,
the three FFN matrices and both norms of each block, and the final norm -- has one copy per
modality group, shape [groups, ...]; each token uses the copy of its modality id (the vocabulary's
modality index: 0 for <pad>/<bos>/<eos>/<mask>, i + 1 for modality i). Self-attention itself stays
global: after the per-modality projections, all tokens of the interleaved sequence attend to each
other under one mask. A token's compute is that of the dense model, so FLOPs per token are unchanged
while the parameter count grows by the number of groups.

Attention: flash-attn when importable and the input is on CUDA (causal masks only), otherwise
torch's scaled_dot_product_attention; `attention: eager` is the plain softmax reference.

Packed rows (`doc_ids` [B, L]: which sample of its row each token belongs to, as numbered by
mmfm.objectives for `document_mask`): a token attends causally within its own sample only, and
rotary positions restart at 0 with every sample, so a packed sample computes exactly what it would
alone (tests/test_packing.py). On CUDA with flash-attn this is flash_attn_varlen_func over the
samples laid end to end (no [L, L] mask is built); elsewhere SDPA with the block-diagonal causal
mask (`document_mask`).

Activation checkpointing (`set_activation_checkpointing`): "full" recomputes each block in
backward from its input; "selective" recomputes only the cheap elementwise work (norms, rotary,
SwiGLU's product) and keeps every matmul's and the attention's output (torch's selective
checkpoint policy, as torchtitan's op-level AC): most of full's memory saving on the elementwise
activations at a fraction of its recompute.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfm.models.config import MODELS, ModelConfig
from mmfm.ops.linear_cross_entropy import masked_linear_cross_entropy

try:  # optional: the [cuda] extra
    from flash_attn import flash_attn_func as _flash_attn_func
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = _flash_attn_varlen_func = None

CHECKPOINTING = ("none", "full", "selective")


IGNORE_INDEX = -100   # mmfm.objectives' label for "no loss here"


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


class GroupLinear(nn.Module):
    """A bias-free linear layer with `groups` weight copies; token t uses copy group_ids[t]."""

    def __init__(self, d_in: int, d_out: int, groups: int = 1):
        super().__init__()
        self.groups = groups
        shape = (d_out, d_in) if groups == 1 else (groups, d_out, d_in)
        self.weight = nn.Parameter(torch.empty(shape))

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        if self.groups == 1:
            return F.linear(x, self.weight)
        return _grouped(x, plan, lambda g, xs: F.linear(xs, self.weight[g]), self.weight.shape[-2])


class GroupRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, groups: int = 1):
        super().__init__()
        self.eps, self.groups = eps, groups
        self.weight = nn.Parameter(torch.ones(dim if groups == 1 else (groups, dim)))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        if self.groups == 1:
            return self.weight * self._norm(x)
        return _grouped(x, plan, lambda g, xs: self.weight[g] * self._norm(xs), x.shape[-1])


def make_plan(group_ids: torch.Tensor | None, groups: int):
    """For modality-sparse layers: [(group, flat token indices)] for the groups present (None if dense)."""
    if groups == 1 or group_ids is None:
        return None
    flat = group_ids.reshape(-1)
    if int(flat.min()) < 0 or int(flat.max()) >= groups:
        raise ValueError(f"modality_ids must lie in [0, {groups}), got [{int(flat.min())}, {int(flat.max())}]")
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=groups).tolist()
    plan, start = [], 0
    for g, c in enumerate(counts):
        if c:
            plan.append((g, order[start:start + c]))
        start += c
    return plan


def _grouped(x: torch.Tensor, plan, fn, d_out: int) -> torch.Tensor:
    if plan is None:
        raise ValueError("a modality-sparse model needs modality_ids")
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1])
    out = xf.new_empty(xf.shape[0], d_out)
    for g, idx in plan:
        out.index_copy_(0, idx, fn(g, xf.index_select(0, idx)))
    return out.reshape(*lead, d_out)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq.float()       # [B, L, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        g, hd = cfg.groups, cfg.head_dim
        self.cfg, self.hd = cfg, hd
        self.q_proj = GroupLinear(cfg.dim, cfg.n_heads * hd, g)
        self.k_proj = GroupLinear(cfg.dim, cfg.n_kv_heads * hd, g)
        self.v_proj = GroupLinear(cfg.dim, cfg.n_kv_heads * hd, g)
        self.o_proj = GroupLinear(cfg.n_heads * hd, cfg.dim, g)

    def forward(self, x, plan, cos, sin, mask, cache=None, layer: int = 0, upto: int = 0, docs=None):
        B, L, _ = x.shape
        c = self.cfg
        H, Hkv = c.n_heads, c.n_kv_heads
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)          # [.., L, 1, hd]: broadcast over heads
        if _plain(self.q_proj, self.k_proj, self.v_proj):
            # one matmul for q, k, v (x read once, one grad-input matmul in backward), and one rotary
            # over q and k together, which are adjacent heads of that output
            w = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
            qkv = F.linear(x, w).view(B, L, H + 2 * Hkv, self.hd)
            qk = qkv[:, :, :H + Hkv]
            qk = qk * cos + rotate_half(qk) * sin
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]
        else:
            q = self.q_proj(x, plan).view(B, L, H, self.hd)
            k = self.k_proj(x, plan).view(B, L, Hkv, self.hd)
            v = self.v_proj(x, plan).view(B, L, Hkv, self.hd)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:   # append this step's keys/values, attend over past + new
            cache.write(layer, k, v)
            k, v = cache.read(layer, upto)
        out = attend(q, k, v, mask, c.attention, docs)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, H * self.hd), plan)


def _plain(*mods) -> bool:
    """Dense GroupLinear projections (not modality-sparse, not wrapped by LoRA): fusable by concatenation."""
    return all(type(m) is GroupLinear and m.groups == 1 for m in mods)


class Documents:
    """The samples packed in a batch's rows, from doc_ids [B, L] (equal ids = one sample; a
    sample's tokens are contiguous). Built once per forward and shared by every layer."""

    def __init__(self, doc_ids: torch.Tensor):
        B, L = doc_ids.shape
        self.shape = (B, L)
        self.ids = doc_ids
        idx = torch.arange(L, device=doc_ids.device).expand(B, L)
        first = torch.ones_like(doc_ids, dtype=torch.bool)
        first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        self.first = first                                   # a sample starts here
        start = torch.where(first, idx, torch.zeros_like(idx)).cummax(1).values
        self.positions = idx - start                        # restart at 0 with every sample
        self._varlen = self._mask = None

    def mask(self) -> torch.Tensor:
        """bool [B, 1, L, L]: causal and within the token's own sample (True = attend)."""
        if self._mask is None:
            L = self.shape[1]
            causal = torch.ones(L, L, dtype=torch.bool, device=self.ids.device).tril()
            self._mask = (causal[None] & (self.ids[:, :, None] == self.ids[:, None, :])).unsqueeze(1)
        return self._mask

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens int32 [n + 1], max_seqlen) of the n samples laid end to end over the rows
        (a row boundary always starts a sample), the layout of flash_attn_varlen_func."""
        if self._varlen is None:
            starts = torch.nonzero(self.first.reshape(-1)).squeeze(1)
            total = torch.tensor([self.first.numel()], device=starts.device)
            cu = torch.cat([starts, total]).to(torch.int32)
            self._varlen = (cu, int((cu[1:] - cu[:-1]).max()))
        return self._varlen


def attend_varlen_reference(q, k, v, cu_seqlens: torch.Tensor):
    """What flash_attn_varlen_func(causal=True) computes, in torch: q [T, H, D], k/v [T, Hkv, D]
    (the rows' tokens end to end), each segment [cu[i], cu[i+1]) causal on its own. For tests of
    the varlen layout on machines without flash-attn."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
        out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=True,
                                                  enable_gqa=q.shape[1] != k.shape[1])[0].transpose(0, 1)
    return out


def attend(q, k, v, mask, backend: str = "auto", docs: Documents | None = None):
    """q [B, H, L, D], k/v [B, Hkv, L, D]; mask None = causal, else bool [B or 1, 1, L, L] (True =
    attend); docs: packed samples, each causal on its own (mask is then ignored)."""
    rep = q.shape[1] // k.shape[1]
    if docs is not None:
        if (backend in ("auto", "flash") and q.is_cuda and _flash_attn_varlen_func is not None
                and q.dtype in (torch.float16, torch.bfloat16)):
            B, H, L, D = q.shape
            cu, longest = docs.varlen()
            flat = [t.transpose(1, 2).reshape(B * L, t.shape[1], D) for t in (q, k, v)]
            out = _flash_attn_varlen_func(*flat, cu, cu, longest, longest, causal=True)
            return out.view(B, L, H, D).transpose(1, 2)
        mask = docs.mask()
    if (backend in ("auto", "flash") and mask is None and q.is_cuda and _flash_attn_func is not None
            and q.dtype in (torch.float16, torch.bfloat16)):
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    if backend == "flash" and _flash_attn_func is None:
        raise RuntimeError("attention: flash requested but flash_attn is not importable")
    if backend != "eager":   # SDPA reads the shared k/v heads itself: no repeated copies of k and v
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=rep > 1)
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    L = q.shape[-2]
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device).tril() if mask is None else mask
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


# what selective checkpointing keeps: the outputs of the matmuls and of attention (the expensive ops);
# everything else in a block (norms, rotary, silu * up, residual adds) is recomputed in backward
_SAVE_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten.linear.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default)


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE
    return create_selective_checkpoint_contexts(policy)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        g = cfg.groups
        self.gate_proj = GroupLinear(cfg.dim, cfg.ffn_hidden, g)
        self.up_proj = GroupLinear(cfg.dim, cfg.ffn_hidden, g)
        self.down_proj = GroupLinear(cfg.ffn_hidden, cfg.dim, g)

    def forward(self, x, plan):
        if _plain(self.gate_proj, self.up_proj):   # gate and up in one matmul
            gate, up = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x, plan), self.up_proj(x, plan)
        return self.down_proj(F.silu(gate) * up, plan)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = GroupRMSNorm(cfg.dim, cfg.norm_eps, cfg.groups)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = GroupRMSNorm(cfg.dim, cfg.norm_eps, cfg.groups)
        self.mlp = MLP(cfg)

    def forward(self, x, plan, cos, sin, mask, cache=None, layer: int = 0, upto: int = 0, docs=None):
        x = x + self.self_attn(self.input_layernorm(x, plan), plan, cos, sin, mask, cache, layer, upto, docs)
        return x + self.mlp(self.post_attention_layernorm(x, plan), plan)


class LMHead(nn.Linear):
    """The output projection (an nn.Linear, so parameter names and loading are unchanged). Called with
    labels (-100 = no loss), it returns the fused chunked loss instead of logits; the loss goes through
    this module's own call so that DeepSpeed ZeRO-3 gathers the weight for it as it does for plain logits."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None):
        if labels is None:
            return super().forward(x)
        return masked_linear_cross_entropy(x, self.weight, labels, token_weights)


@MODELS.register("transformer", ModelConfig)
class Transformer(nn.Module):
    """forward(ids [B, L], modality_ids [B, L] or None, attn_mask None (causal) or bool [B, L, L])
    -> logits [B, L, vocab_size].

    With cache= (mmfm.models.kv_cache.KVCache), ids are the new tokens only: their keys/values are
    appended to the cache, attention covers the cached past plus the new tokens (attn_mask, if
    given, is the [B, L, L] mask among the new tokens, e.g. a draft tree), positions default to
    the cache slots, and the cache's lengths advance by L (or by counts[b] for ragged rows).
    return_hidden=True returns the final-norm hidden states [B, L, dim] instead of logits.

    Training goes through `loss` (forward with labels=): the output projection and cross-entropy
    run fused in row chunks (mmfm/ops/linear_cross_entropy.py), only over labelled positions. With
    a flow head (cfg.flow_latent_dim > 0) and flow_latents= [B, L, D] / flow_mask= [B, L] beside
    labels=, it also returns the head's per-target flow-matching errors (mmfm/models/flow_head.py):
    (loss, ce, flow_errors [N]); the objective weighs and adds them (mmfm/objectives)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set (>= 1) before building the model")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = GroupRMSNorm(cfg.dim, cfg.norm_eps, cfg.groups)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg.dim, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.checkpointing = "none"
        self.reset_parameters()
        self.flow_head = None
        if cfg.flow_latent_dim:   # built after the decoder's draws, so those equal a model's without the head
            from mmfm.models.flow_head import FlowHead

            self.flow_head = FlowHead(cfg.dim, cfg.flow_latent_dim, cfg.flow_width, cfg.flow_depth)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.startswith("flow_head."):   # its own init (zero-started modulation)
                continue
            if p.dim() >= 2 and "layernorm" not in name and not name.startswith("norm"):
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_activation_checkpointing(self, mode: str) -> None:
        """"none", "full" or "selective" (module docstring); takes effect in training mode only."""
        if mode not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing: expected one of {', '.join(CHECKPOINTING)}, got {mode!r}")
        self.checkpointing = mode

    def _run_layer(self, layer, *args):
        mode = getattr(self, "checkpointing", "none")
        if mode == "none" or not self.training or not torch.is_grad_enabled() or args[5] is not None:
            return layer(*args)
        from torch.utils.checkpoint import checkpoint

        kw = {"context_fn": _selective_context} if mode == "selective" else {}
        return checkpoint(layer, *args, use_reentrant=False, **kw)

    def forward(self, ids: torch.Tensor, modality_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache=None, counts: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                return_hidden: bool = False, *, labels: torch.Tensor | None = None,
                label_weights: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                flow_latents: torch.Tensor | None = None, flow_mask: torch.Tensor | None = None):
        B, L = ids.shape if ids is not None else inputs_embeds.shape[:2]
        if L > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds max_seq_len {self.cfg.max_seq_len}")
        plan = make_plan(modality_ids, self.cfg.groups)
        x = self.embed_tokens(ids) if inputs_embeds is None else inputs_embeds
        docs = None
        if doc_ids is not None:
            if cache is not None or attn_mask is not None:
                raise ValueError("doc_ids (packed samples) cannot be combined with cache= or attn_mask=")
            if doc_ids.shape != (B, L):
                raise ValueError(f"doc_ids: expected [B, L] = {[B, L]} like ids, got {list(doc_ids.shape)}")
            docs = Documents(doc_ids)
            if positions is None:
                positions = docs.positions
        if cache is not None:
            if cache.batch != B:
                raise ValueError(f"cache holds {cache.batch} rows but ids has {B}")
            if positions is None:
                positions = cache.lengths[:, None] + torch.arange(L, device=x.device)[None, :]
            upto = cache.begin(L, counts)
            mask = cache.attention_mask(L, upto, attn_mask)
        else:
            if positions is None:   # [1, L]: cos/sin computed once and broadcast over the batch
                positions = torch.arange(L, device=x.device).unsqueeze(0)
            mask = None if attn_mask is None else attn_mask.unsqueeze(1)
            upto = 0
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = self._run_layer(layer, x, plan, cos, sin, mask, cache, i, upto, docs)
        if cache is not None:
            cache.advance(L, counts)
        x = self.norm(x, plan)
        if return_hidden:
            return x
        if labels is not None:
            if flow_latents is not None:
                return (*self._loss_head(x, labels, label_weights), self._flow_loss(x, flow_latents, flow_mask))
            return self._loss_head(x, labels, label_weights)
        if self.lm_head is None:
            return F.linear(x, self.embed_tokens.weight)
        return self.lm_head(x)

    # torch.compile (train.compile) traces this with static shapes and no graph break: the selection
    # of labelled rows (a data-dependent size) happens inside the fused loss op, an opaque custom op
    # with a fake implementation (mmfm/ops/linear_cross_entropy.py: masked_linear_cross_entropy)
    def _loss_head(self, x: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor | None):
        if labels.shape != x.shape[:2]:
            raise ValueError(f"labels: expected [B, L] = {list(x.shape[:2])} like ids, got {list(labels.shape)}")
        h = x.reshape(-1, x.shape[-1])
        lab = labels.reshape(-1)
        w = None if label_weights is None else label_weights.reshape(-1)
        if self.lm_head is None:
            loss, ce = masked_linear_cross_entropy(h, self.embed_tokens.weight, lab, w)
        else:
            loss, ce = self.lm_head(h, lab, w)
        return loss, ce.view(labels.shape)

    @torch.compiler.disable
    def _flow_loss(self, x: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The flow head's per-target errors [N] at the positions in mask [B, L] (targets latents
        [B, L, D]), in row-major order of the mask (mmfm/models/flow_head.py)."""
        if self.flow_head is None:
            raise ValueError("flow_latents: this model has no flow head (model config flow_latent_dim is 0)")
        if mask is None or mask.shape != x.shape[:2] or latents.shape != (*x.shape[:2], self.cfg.flow_latent_dim):
            raise ValueError(f"flow_latents / flow_mask: expected [B, L, {self.cfg.flow_latent_dim}] and [B, L] with "
                             f"[B, L] = {list(x.shape[:2])}, got {list(latents.shape)} and "
                             f"{None if mask is None else list(mask.shape)}")
        rows = torch.nonzero(mask.reshape(-1)).squeeze(1)
        h = x.reshape(-1, x.shape[-1]).index_select(0, rows)
        return self.flow_head(h, latents.reshape(-1, latents.shape[-1]).index_select(0, rows))

    def loss(self, ids: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor | None = None,
             modality_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
             positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None):
        """(sum over labelled positions of label_weights * CE, per-position CE [B, L] fp32 detached,
        0 where labels == -100). Equals F.cross_entropy on forward()'s logits; the logits are never
        materialised. The trainer calls this through the engine as forward(..., labels=...)."""
        return self(ids, modality_ids, attn_mask, positions, labels=labels, label_weights=label_weights,
                    doc_ids=doc_ids)
