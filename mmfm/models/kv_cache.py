"""A preallocated (static) key-value cache for the Transformer.

    cache = KVCache.for_model(model, batch=B, capacity=T)
    logits = model(ids, cache=cache)           # appends ids' keys/values, advances cache.lengths

Layout: k and v are [n_layers, B, Hkv, T, head_dim]; row b holds cache.lengths[b] entries in
slots [0, lengths[b]), contiguous. A token's rotary position is its slot index unless the caller
passes positions. Memory is allocated once, so a decode loop never reallocates (and a CUDA graph
could capture the step).

Ragged batches: model(ids, cache=cache, counts=n) appends only the first n[b] tokens of row b
(prefill of right-padded prompts); the logits of row b's last real token are at n[b] - 1.

Attention inside a cached forward: query i of row b sees slots [0, lengths[b]) (the past) and the
new tokens j <= i (causal), or, when attn_mask [B, L, L] is given (a draft tree), the past plus
the new tokens attn_mask[b, i, j] allows.

The cache also carries the ops generation and cache augmentation need: truncate (drop rejected
drafts), keep (compact accepted tree nodes), reorder rows (beams), insert latent entries.
"""
from __future__ import annotations

import torch

from mmfm.ops import cache as cache_ops


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        if batch < 1 or capacity < 1:
            raise ValueError(f"KVCache: batch and capacity must be >= 1, got batch={batch}, capacity={capacity}")
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity

    @classmethod
    def for_model(cls, model, batch: int, capacity: int | None = None, dtype=None, device=None) -> "KVCache":
        cfg = model.cfg
        p = next(model.parameters())
        capacity = cfg.max_seq_len if capacity is None else capacity
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, capacity, cfg.head_dim,
                   dtype=dtype or p.dtype, device=device or p.device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    # ---------------------------------------------------------------- used by the model
    def begin(self, L: int, counts: torch.Tensor | None) -> int:
        """Plan one forward's append of L tokens (counts[b] for ragged rows): the capacity check and
        the choice of copy are made once here, not per layer. Returns the number of slots
        attention must read (max over rows of lengths + L)."""
        top = int(self.lengths.max())
        if counts is None and top + L > self.capacity:
            raise ValueError(f"KVCache: appending {L} tokens exceeds capacity {self.capacity} "
                             f"(lengths up to {top})")
        # the common case (every row at the same length, no counts): one slice copy per layer
        self._start = top if counts is None and int(self.lengths.min()) == top else None
        self._counts = counts
        return top + L

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append this forward's keys/values ([B, Hkv, L, D]) for one layer as planned by begin()."""
        s = self._start
        if s is not None:
            L = k.shape[2]
            self.k[layer, :, :, s:s + L] = k
            self.v[layer, :, :, s:s + L] = v
        else:
            cache_ops.kv_append(self.k[layer], k, self.lengths, self._counts)
            cache_ops.kv_append(self.v[layer], v, self.lengths, self._counts)

    def read(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, :, :, :upto], self.v[layer, :, :, :upto]

    def attention_mask(self, L: int, upto: int, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """bool [B, 1, L, upto]: True where query i of row b may attend slot j."""
        dev = self.lengths.device
        j = torch.arange(upto, device=dev)[None, None, :]          # [1, 1, upto]
        start = self.lengths[:, None, None]                        # [B, 1, 1]
        past = j < start
        rel = j - start                                            # new-token index of slot j
        i = torch.arange(L, device=dev)[None, :, None]             # [1, L, 1]
        if tree_mask is None:
            new = (rel >= 0) & (rel <= i)
        else:
            relc = rel.clamp(0, L - 1).expand(self.batch, L, upto)
            new = (rel >= 0) & (rel < L) & torch.gather(tree_mask.bool(), 2, relc)
        return (past | new).unsqueeze(1)

    def advance(self, L: int, counts: torch.Tensor | None) -> None:
        self.lengths += L if counts is None else counts.to(self.lengths)

    # ---------------------------------------------------------------- used by decoders
    def truncate(self, lengths: torch.Tensor | int) -> None:
        """Forget entries past lengths (e.g. rejected draft tokens). Slots are not cleared."""
        new = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device).expand_as(self.lengths)
        if bool((new > self.lengths).any()) or bool((new < 0).any()):
            raise ValueError("KVCache.truncate: lengths must lie in [0, current lengths]")
        self.lengths = new.clone()

    def keep(self, row: int, start: int, offsets) -> None:
        """Row `row`: move slots start + offsets[i] to start + i (accepted nodes of a draft tree,
        offsets ascending, a tensor or a list) and set the row's length to start + len(offsets).

        Runs once per verification pass of speculative decoding, so it is a handful of ops: the
        leading offsets already in place (offsets[i] == i: the root, and a path along the first
        nodes) are skipped, the rest moved with one index_select and one copy per buffer (the
        advanced-indexing assignment it replaces took ~47 us a pass on the byte-level bench
        model, this ~15 us)."""
        offs = offsets.tolist() if isinstance(offsets, torch.Tensor) else list(offsets)
        n = len(offs)
        m = next((i for i, o in enumerate(offs) if o != i), n)
        if m < n:
            src = torch.tensor([start + o for o in offs[m:]], dtype=torch.long, device=self.k.device)
            for buf in (self.k, self.v):       # [n_layers, B, Hkv, T, D]; slots: dim 3 (2 of a row's view)
                b, dim = (buf, 3) if buf.shape[1] == 1 else (buf.select(1, row), 2)
                b.narrow(dim, start + m, n - m).copy_(b.index_select(dim, src))
        if self.lengths.shape[0] == 1:
            self.lengths.fill_(start + n)
        else:
            self.lengths[row] = start + n

    def reorder_rows(self, rows: torch.Tensor) -> None:
        """Row b becomes old row rows[b] (beam search, CFG row duplication); batch may change."""
        self.k = torch.stack([cache_ops.kv_gather_rows(self.k[l], rows) for l in range(self.k.shape[0])])
        self.v = torch.stack([cache_ops.kv_gather_rows(self.v[l], rows) for l in range(self.v.shape[0])])
        self.lengths = self.lengths.index_select(0, rows.to(self.lengths.device, torch.long))

    def insert(self, at: torch.Tensor | int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Insert N entries per layer (k, v: [n_layers, B, Hkv, N, D]) at slot `at` of every row,
        shifting later entries right (cache augmentation's latents). Positions already baked into
        the shifted keys are unchanged."""
        N = k.shape[3]
        for layer in range(self.k.shape[0]):
            cache_ops.kv_insert(self.k[layer], self.lengths, at, k[layer])
            cache_ops.kv_insert(self.v[layer], self.lengths, at, v[layer])
        self.lengths += N
