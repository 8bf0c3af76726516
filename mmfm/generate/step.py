"""One decode step of a dense Transformer (one new token per row), written for the decode loop.

Transformer.forward is general (prompts, draft trees, modality-sparse weights, ragged prefill);
per generated token on a CPU its cost at demo sizes is mostly op dispatch, not arithmetic. This
step computes the same function with about a third of the ops:

  * each RMSNorm weight (times sqrt(dim)) is folded into the columns of the matmul that follows
    it, and the per-row factor is applied to that matmul's output: norm(x) @ W^T =
    rsqrt(sum(x^2) + dim * eps) * (x @ (W * w * sqrt(dim))^T), inside the matmul's call;
  * q/k/v and gate/up are single matmuls over weights concatenated once; the
    o and down projections add the residual in the same call;
  * rotary cos/sin come from a table over positions, looked up once per step for all layers;
    q and k are rotated together as qk * cos + roll(qk, hd/2) * [-sin, sin];
  * the attention mask (ragged rows only) is built once per step; no nn.Module calls;
  * every matmul is mmfm.ops.linear.decode_linear on weights packed when the step is built: on a
    CPU in float32 the compiled op reads each weight once per step and fuses the RMSNorm factor
    and the residual add (a draft tree of up to 12 nodes costs about one step's weight reads);
    elsewhere the same call is torch.mm / addmm;
  * attention on a CPU in float32 is the compiled decode_attention (mmfm.ops.attention), reading
    the cache layer in place (ragged rows and tree masks included), where its vectorised kernel
    covers the head size (compiled_op_for); elsewhere torch's SDPA.

The folded weights are copies taken when the step is built, so build it after loading and don't
train the model while decoding. Low-precision models fold and normalise in their own dtype
(Transformer.forward normalises in fp32), so bf16/fp16 logits can differ in the last bits. tests/test_generate.py checks that greedy decoding through this
step equals greedy decoding by recomputing the whole sequence with Transformer.forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfm.ops.attention import compiled_op_for
from mmfm.ops.linear import decode_linear, pack_linear


class DenseStep:
    """step(tokens [B], cache, upto, ragged) -> logits [B, V]; appends to `cache` and advances its
    lengths. step.tree(...) feeds a draft tree of one row (speculative decoding) the same way."""

    def __init__(self, model, capacity: int):
        cfg = model.cfg
        if cfg.groups != 1:
            raise ValueError("DenseStep: modality-sparse models decode through Transformer.forward")
        self.cfg = cfg
        self.H, self.Hkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.ffn = cfg.ffn_hidden
        self.embed = model.embed_tokens.weight
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        self.layers = []
        root = float(cfg.dim) ** 0.5
        self.dim_eps = cfg.dim * cfg.norm_eps
        self._views = (None, None, None)
        with torch.no_grad():
            for blk in model.layers:
                a, m = blk.self_attn, blk.mlp
                w_in, w_post = blk.input_layernorm.weight, blk.post_attention_layernorm.weight
                qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0) * (w_in * root)[None, :]
                gu = torch.cat([m.gate_proj.weight, m.up_proj.weight], 0) * (w_post * root)[None, :]
                # weights as [in, out] (F.linear's [out, in] storage seen through .t()); pack_linear
                # packs them for the compiled op or keeps them for torch
                self.layers.append((pack_linear(qkv.t()), pack_linear(a.o_proj.weight.t()), pack_linear(gu.t()),
                                    pack_linear(m.down_proj.weight.t())))
            self.head = pack_linear((head * (model.norm.weight * root)[None, :]).t())
            pos = torch.arange(capacity, device=self.embed.device)
            cos, sin = model.rotary(pos[None], self.embed.dtype)          # [1, T, hd]
            half = self.hd // 2
            self.cos = cos[0].contiguous()
            self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1).contiguous()
        # the compiled attention where its kernel beats SDPA, else None (SDPA); called bare: the
        # wrapper's per-call checks cost ~2% of a step
        self.attn_op = compiled_op_for(self.embed.device, self.embed.dtype, self.hd)

    def _layer_views(self, cache) -> list:
        """Per-layer views of the cache, taken once per cache rather than every step: (k, v) of
        every row [B, Hkv, T, hd], and row 0's as [1, Hkv, T, hd] (tree passes)."""
        if self._views[0] is not cache or self._views[2] is not cache.k:
            self._views = (cache, [(cache.k[i], cache.v[i], cache.k[i].narrow(0, 0, 1), cache.v[i].narrow(0, 0, 1))
                                   for i in range(len(self.layers))], cache.k)
        return self._views[1]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache, upto: int, ragged: bool) -> torch.Tensor:
        """tokens [B]; upto = max(cache.lengths) + 1 (the caller tracks it, so there is no host
        read); ragged = whether rows have different lengths."""
        B = tokens.shape[0]
        H, Hkv, hd = self.H, self.Hkv, self.hd
        nqk = (H + Hkv) * hd
        pos = cache.lengths                                                 # [B]
        s = upto - 1
        mask = rows = None
        if ragged:
            cos = self.cos[pos][:, None, :]                                 # [B, 1, hd]
            sin = self.sin[pos][:, None, :]
            mask = (torch.arange(upto, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]
            rows = torch.arange(B, device=pos.device)
        else:                                   # every row at position s: one row, broadcast
            cos, sin = self.cos[s], self.sin[s]
        x = F.embedding(tokens, self.embed)                                 # [B, D]
        # narrow/select rather than [] with slices: the same views at a fraction of the dispatch cost
        ffn = self.ffn
        for (w_qkv, w_o, w_gu, w_down), (kc, vc, _, _) in zip(self.layers, self._layer_views(cache)):
            qkv = decode_linear(x, w_qkv, self.dim_eps)                    # [B, (H + 2 Hkv) hd], normed
            qk = qkv.narrow(1, 0, nqk).view(B, H + Hkv, hd)
            qk = torch.addcmul(qk * cos, torch.roll(qk, hd // 2, -1), sin)
            v = qkv.narrow(1, nqk, Hkv * hd).view(B, Hkv, hd)
            k = qk.narrow(1, H, Hkv)
            if ragged:
                kc[rows, :, pos] = k
                vc[rows, :, pos] = v
            else:
                kc.select(2, s).copy_(k)
                vc.select(2, s).copy_(v)
            if self.attn_op is not None:      # keys [0, pos[b]] of each row, read in place
                att = self.attn_op(qk.narrow(1, 0, H).unsqueeze(1), kc, vc, pos, None, False)
            else:
                att = F.scaled_dot_product_attention(qk.narrow(1, 0, H).unsqueeze(2), kc.narrow(2, 0, upto),
                                                     vc.narrow(2, 0, upto), attn_mask=mask, enable_gqa=H != Hkv)
            x = decode_linear(att.reshape(B, H * hd), w_o, residual=x)
            gu = decode_linear(x, w_gu, self.dim_eps)
            x = decode_linear(F.silu(gu.narrow(1, 0, ffn)).mul_(gu.narrow(1, ffn, ffn)), w_down, residual=x)
        cache.lengths += 1
        return decode_linear(x, self.head, self.dim_eps)

    @torch.no_grad()
    def tree(self, tokens: torch.Tensor, cache, start: int, depth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Feed the n nodes of one draft tree to row 0 of `cache` in one pass; logits [n, V].

        tokens [n] int64 (node 0 = the last emitted token, the root); depth [n] int64 (node i sits
        at position start + depth[i]); mask bool [n, n]: node i sees node j (itself and its
        ancestors). Keys/values go to slots [start, start + n) of row 0 and cache.lengths is left
        as it was: the caller keeps the accepted path (KVCache.keep) and sets the length. The
        same arithmetic as __call__ (and as Transformer.forward with attn_mask), n rows at once;
        start = the row's current length, passed by the caller so there is no host read."""
        n = tokens.shape[0]
        H, Hkv, hd = self.H, self.Hkv, self.hd
        nqk = (H + Hkv) * hd
        upto = start + n
        if upto > cache.capacity:
            raise ValueError(f"DenseStep.tree: {n} nodes after {start} cached tokens exceed the cache's capacity "
                             f"{cache.capacity}")
        pos = depth + start
        cos = self.cos.index_select(0, pos).unsqueeze(1)                   # [n, 1, hd]
        sin = self.sin.index_select(0, pos).unsqueeze(1)
        if self.attn_op is not None:
            prefix = torch.tensor([start], dtype=torch.long)               # the tree's keys follow the prefix
        else:   # an additive float mask, made once per pass (SDPA converts a bool mask in every layer)
            attn = torch.zeros(1, 1, n, upto, dtype=self.embed.dtype, device=tokens.device)
            attn.narrow(3, start, n).masked_fill_(mask.logical_not(), float("-inf"))
        x = F.embedding(tokens, self.embed)                                # [n, D]
        ffn = self.ffn
        for (w_qkv, w_o, w_gu, w_down), (_, _, kc, vc) in zip(self.layers, self._layer_views(cache)):
            qkv = decode_linear(x, w_qkv, self.dim_eps)
            qk = qkv.narrow(1, 0, nqk).view(n, H + Hkv, hd)
            qk = torch.addcmul(qk * cos, torch.roll(qk, hd // 2, -1), sin)          # [n, H + Hkv, hd]
            kc[0].narrow(1, start, n).copy_(qk.narrow(1, H, Hkv).transpose(0, 1))
            vc[0].narrow(1, start, n).copy_(qkv.narrow(1, nqk, Hkv * hd).view(n, Hkv, hd).transpose(0, 1))
            if self.attn_op is not None:
                att = self.attn_op(qk.narrow(1, 0, H).unsqueeze(0), kc, vc, prefix, mask, False)   # [1, n, H, hd]
                att = att.view(n, H * hd)
            else:
                att = F.scaled_dot_product_attention(qk.narrow(1, 0, H).transpose(0, 1).unsqueeze(0),
                                                     kc.narrow(2, 0, upto), vc.narrow(2, 0, upto), attn_mask=attn,
                                                     enable_gqa=H != Hkv)
                att = att[0].transpose(0, 1).reshape(n, H * hd)
            x = decode_linear(att, w_o, residual=x)
            gu = decode_linear(x, w_gu, self.dim_eps)
            x = decode_linear(F.silu(gu.narrow(1, 0, ffn)).mul_(gu.narrow(1, ffn, ffn)), w_down, residual=x)
        return decode_linear(x, self.head, self.dim_eps)
