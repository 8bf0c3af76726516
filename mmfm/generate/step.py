"""One decode step of a dense Transformer (one new token per row), written for the decode loop.

Transformer.forward is general (prompts, draft trees, modality-sparse weights, ragged prefill);
per generated token on a CPU its cost at demo sizes is mostly Python and op dispatch, not
arithmetic. This step computes the same function with a fraction of the ops:

  * q/k/v and gate/up are single matmuls over weights concatenated once at construction;
  * RMSNorm is torch's fused F.rms_norm (fp32 models: the same formula as GroupRMSNorm);
  * rotary cos/sin come from a table over positions, looked up once per step for all layers;
  * q and k are rotated together; the attention mask (ragged rows only) is built once per step;
  * no nn.Module calls.

The weights are views/copies taken when the step is built, so build it after loading and don't
train the model while decoding. tests/test_generate.py checks that greedy decoding through this
step equals greedy decoding by recomputing the whole sequence with Transformer.forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseStep:
    """step(tokens [B], cache) -> logits [B, V]; appends to `cache` and advances its lengths."""

    def __init__(self, model, capacity: int):
        cfg = model.cfg
        if cfg.groups != 1:
            raise ValueError("DenseStep: modality-sparse models decode through Transformer.forward")
        self.cfg = cfg
        self.H, self.Hkv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        self.embed = model.embed_tokens.weight
        self.head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        self.final_norm = model.norm.weight
        self.layers = []
        with torch.no_grad():
            for blk in model.layers:
                a, m = blk.self_attn, blk.mlp
                self.layers.append((
                    blk.input_layernorm.weight,
                    torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0).contiguous(),
                    a.o_proj.weight,
                    blk.post_attention_layernorm.weight,
                    torch.cat([m.gate_proj.weight, m.up_proj.weight], 0).contiguous(),
                    m.down_proj.weight,
                ))
            pos = torch.arange(capacity, device=self.embed.device)
            cos, sin = model.rotary(pos[None], self.embed.dtype)          # [1, T, hd]
            self.cos, self.sin = cos[0], sin[0]
        self.ffn = cfg.ffn_hidden

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache, upto: int, ragged: bool) -> torch.Tensor:
        """tokens [B]; upto = max(cache.lengths) + 1 (the caller tracks it, so there is no host
        read); ragged = whether rows have different lengths."""
        B = tokens.shape[0]
        H, Hkv, hd = self.H, self.Hkv, self.hd
        D = self.cfg.dim
        pos = cache.lengths                                                 # [B]
        cos = self.cos[pos][:, None, :]                                     # [B, 1, hd]
        sin = self.sin[pos][:, None, :]
        half = hd // 2
        mask = None
        rows = None
        if ragged:
            mask = (torch.arange(upto, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]
            rows = torch.arange(B, device=pos.device)
        s = upto - 1
        x = F.embedding(tokens, self.embed)                                 # [B, D]
        for i, (w_in, w_qkv, w_o, w_post, w_gu, w_down) in enumerate(self.layers):
            h = F.rms_norm(x, (D,), w_in, self.eps)
            qkv = F.linear(h, w_qkv)                                        # [B, (H + 2 Hkv) hd]
            qk = qkv[:, :(H + Hkv) * hd].view(B, H + Hkv, hd)
            rot = torch.cat((-qk[..., half:], qk[..., :half]), -1)
            qk = qk * cos + rot * sin
            q = qk[:, :H, None, :]                                          # [B, H, 1, hd]
            k = qk[:, H:, :]                                                # [B, Hkv, hd]
            v = qkv[:, (H + Hkv) * hd:].view(B, Hkv, hd)
            kc, vc = cache.k[i], cache.v[i]                                 # [B, Hkv, T, hd]
            if ragged:
                kc[rows, :, pos] = k
                vc[rows, :, pos] = v
            else:
                kc[:, :, s] = k
                vc[:, :, s] = v
            att = F.scaled_dot_product_attention(q, kc[:, :, :upto], vc[:, :, :upto], attn_mask=mask,
                                                 enable_gqa=H != Hkv)
            x = x + F.linear(att.reshape(B, H * hd), w_o)
            h = F.rms_norm(x, (D,), w_post, self.eps)
            gu = F.linear(h, w_gu)
            x = x + F.linear(F.silu(gu[:, :self.ffn]) * gu[:, self.ffn:], w_down)
        cache.lengths += 1
        return F.linear(F.rms_norm(x, (D,), self.final_norm, self.eps), self.head)
