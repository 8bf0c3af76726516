"""transformers model of an mmfm modality-sparse (Mixture-of-Transformers) export, written by
`mmfm export` beside configuration_mmfm.py and loaded with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. Self-contained (torch and
transformers only), so the folder runs where mmfm is not installed.

The arithmetic is mmfm's Transformer (mmfm/models/transformer.py): Llama's block (RMSNorm in fp32,
rotary with rotate_half, SwiGLU, grouped-query attention), where every non-embedding weight has one
copy per modality group, shape [groups, ...], and each token uses the copy of its id's group
(config.modality_runs). Attention stays global: all tokens attend to each other under one causal
mask. Parameter names are mmfm's own (embed_tokens.weight, layers.0.self_attn.q_proj.weight, ...,
norm.weight, lm_head.weight), so the export's safetensors load unchanged. Keys and values are kept
in transformers' Cache (DynamicCache by default), so `generate` decodes incrementally.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mmfm import MmfmConfig

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class GroupLinear(nn.Module):
    """Bias-free linear layer with `groups` weight copies [groups, d_out, d_in]; row t uses copy group[t]."""

    def __init__(self, d_in, d_out, groups):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, d_out, d_in))

    def forward(self, x, groups):
        out = x.new_empty(*x.shape[:-1], self.weight.shape[1])
        for g in torch.unique(groups).tolist():
            rows = groups == g
            out[rows] = F.linear(x[rows], self.weight[g])
        return out


class GroupRMSNorm(nn.Module):
    def __init__(self, dim, eps, groups):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(groups, dim))

    def forward(self, x, groups):
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.weight[groups] * h


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: MmfmConfig, layer_idx: int):
        super().__init__()
        G, d, hd = cfg.num_groups, cfg.hidden_size, cfg.head_dim
        self.layer_idx, self.cfg = layer_idx, cfg
        self.input_layernorm = GroupRMSNorm(d, cfg.rms_norm_eps, G)
        self.post_attention_layernorm = GroupRMSNorm(d, cfg.rms_norm_eps, G)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = GroupLinear(d, cfg.num_attention_heads * hd, G)
        self.self_attn.k_proj = GroupLinear(d, cfg.num_key_value_heads * hd, G)
        self.self_attn.v_proj = GroupLinear(d, cfg.num_key_value_heads * hd, G)
        self.self_attn.o_proj = GroupLinear(cfg.num_attention_heads * hd, d, G)
        self.mlp = nn.Module()
        self.mlp.gate_proj = GroupLinear(d, cfg.intermediate_size, G)
        self.mlp.up_proj = GroupLinear(d, cfg.intermediate_size, G)
        self.mlp.down_proj = GroupLinear(cfg.intermediate_size, d, G)

    def forward(self, x, groups, cos, sin, mask, cache):
        B, L, _ = x.shape
        H, Hkv, hd = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        a = self.self_attn
        h = self.input_layernorm(x, groups)
        q = a.q_proj(h, groups).view(B, L, H, hd)
        k = a.k_proj(h, groups).view(B, L, Hkv, hd)
        v = a.v_proj(h, groups).view(B, L, Hkv, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hkv)
        x = x + a.o_proj(out.transpose(1, 2).reshape(B, L, H * hd), groups)
        h = self.post_attention_layernorm(x, groups)
        m = self.mlp
        return x + m.down_proj(F.silu(m.gate_proj(h, groups)) * m.up_proj(h, groups), groups)


class MmfmPreTrainedModel(PreTrainedModel):
    config_class = MmfmConfig
    base_model_prefix = "mmfm"
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (GroupLinear, nn.Embedding, nn.Linear)):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, GroupRMSNorm):
            nn.init.ones_(module.weight)


class MmfmForCausalLM(MmfmPreTrainedModel, GenerationMixin):
    def __init__(self, config: MmfmConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = GroupRMSNorm(config.hidden_size, config.rms_norm_eps, config.num_groups)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                        bias=False)
        self._tables = None
        self.post_init()

    def tables(self, device):
        """(group of every id [vocab_size], rotary inverse frequencies), built from the config on first
        use per device. Plain attributes, not buffers: from_pretrained builds the model on the meta
        device and would leave non-persistent buffers uninitialised."""
        if self._tables is None or self._tables[0].device != device:
            c = self.config
            table = torch.zeros(c.vocab_size, dtype=torch.long)
            for start, stop, group in c.modality_runs:
                table[start:stop] = group
            hd = c.head_dim
            inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
            self._tables = (table.to(device), inv.to(device))
        return self._tables

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        # transformers 5.x names the cache `cache`; earlier versions `past_key_values`: take either
        past_key_values = cache if cache is not None else past_key_values
        if input_ids is None:
            raise ValueError("MmfmForCausalLM needs input_ids: a token's id picks its modality's weights")
        B, L = input_ids.shape
        group_of_id, inv_freq = self.tables(input_ids.device)
        groups = group_of_id[input_ids]
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(L, device=x.device) + past)[None].expand(B, L)
        freqs = position_ids.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[:, :, None], emb.sin().to(x.dtype)[:, :, None]
        # [B, 1, L, past + L]: causal over the cached past and the new tokens, minus padded keys;
        # a query always sees itself, so a padded query row is not all -inf (its output is unused)
        keys = torch.arange(past + L, device=x.device)
        mask = (keys[None, :] <= (keys[past:, None]))[None, None].expand(B, 1, L, past + L)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -(past + L):].bool()
            mask = mask | (keys[None, :] == keys[past:, None])[None, None]
        for layer in self.layers:
            x = layer(x, groups, cos, sin, mask, past_key_values if use_cache else None)
        x = self.norm(x, groups)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = F.linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: past_key_values if use_cache else None})
