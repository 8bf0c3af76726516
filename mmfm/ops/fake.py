"""Fake (meta) implementations of every torch.ops.mmfm.* op, for torch.compile.

Dynamo and AOTAutograd trace a graph with FakeTensors: shapes, dtypes and devices, no data. A
custom op without a fake implementation cannot be traced, so compile breaks the graph around it
(or fails under fullgraph=True). Each function below states what the op's binding allocates
(csrc/<family>/*_binding.cpp) and nothing else; the argument checks stay in the kernels and the
Python wrappers. Keep these in step with csrc/bindings.cpp: tests/test_compile_switches.py traces
every op with fullgraph=True and compares it with eager.

Registered once, when mmfm.ops is imported and the extension loaded (`register()`); without the
extension there are no torch.ops.mmfm ops, and the references compile as plain torch.

Ops written in Python as torch.library custom ops (namespace `mmfm_py`, present with or without
the extension) carry their fake and autograd formula next to their definition instead:
`mmfm_py::masked_linear_cross_entropy` (mmfm/ops/linear_cross_entropy.py), the training loss
head, opaque to torch.compile so its data-dependent row selection is no graph break.
"""
from __future__ import annotations

import torch

_DONE = {"registered": False}


def _rows(t: torch.Tensor) -> int:
    return t.shape[0]


def _register_all() -> None:
    fake = torch.library.register_fake

    # quantization (csrc/quant/quant_binding.cpp)
    @fake("mmfm::nearest_code")
    def _(z, codebook, topk=1, cosine=False):
        return z.new_empty((_rows(z), topk), dtype=torch.long), z.new_empty((_rows(z), topk), dtype=torch.float32)

    @fake("mmfm::code_stats")
    def _(z, indices, num_codes):
        return (z.new_empty((num_codes, z.shape[1]), dtype=torch.float32),
                z.new_empty((num_codes,), dtype=torch.float32))

    @fake("mmfm::ema_codebook_update")
    def _(cluster_size, embed_sum, counts, sums, decay, eps, dead_threshold):
        return (torch.empty_like(cluster_size), torch.empty_like(embed_sum), torch.empty_like(embed_sum),
                cluster_size.new_empty((cluster_size.shape[0],), dtype=torch.bool))

    @fake("mmfm::fsq_quantize")
    def _(z, levels):
        return z.new_empty(z.shape, dtype=torch.float32), z.new_empty((_rows(z),), dtype=torch.long)

    @fake("mmfm::fsq_indices_to_codes")
    def _(indices, levels):
        return indices.new_empty((_rows(indices), levels.shape[0]), dtype=torch.float32)

    @fake("mmfm::fsq_codes_to_indices")
    def _(codes, levels):
        return codes.new_empty((_rows(codes),), dtype=torch.long)

    @fake("mmfm::lfq_quantize")
    def _(z):
        return z.new_empty(z.shape, dtype=torch.float32), z.new_empty((_rows(z),), dtype=torch.long)

    @fake("mmfm::lfq_indices_to_codes")
    def _(indices, dim):
        return indices.new_empty((_rows(indices), dim), dtype=torch.float32)

    @fake("mmfm::lfq_entropy")
    def _(z, temperature, exact):
        return z.new_empty((2,))

    @fake("mmfm::lfq_entropy_backward")
    def _(grad_out, z, temperature, exact):
        return torch.empty_like(z)

    @fake("mmfm::residual_vq")
    def _(z, codebooks):
        n, m, d = _rows(z), codebooks.shape[0], codebooks.shape[2]
        return (z.new_empty((n, m), dtype=torch.long), z.new_empty((n, d), dtype=torch.float32),
                z.new_empty((n, m), dtype=torch.float32))

    # sampling (csrc/sampling/sampling_binding.cpp)
    @fake("mmfm::sample")
    def _(logits, params, allowed_range, allowed_mask, history, seed, offset, row_offsets=None):
        b = _rows(logits)
        return logits.new_empty((b,), dtype=torch.long), logits.new_empty((b,), dtype=torch.float32)

    @fake("mmfm::processed_probs")
    def _(logits, params, allowed_range, allowed_mask, history):
        return logits.new_empty(logits.shape, dtype=torch.float32)

    @fake("mmfm::verify_chain")
    def _(target_probs, draft_probs, draft_tokens, seed, offset):
        b = _rows(target_probs)
        return target_probs.new_empty((b,), dtype=torch.long), target_probs.new_empty((b,), dtype=torch.long)

    @fake("mmfm::verify_multi_draft")
    def _(target_probs, draft_probs, candidates, replacement, seed, offset):
        b = _rows(target_probs)
        return target_probs.new_empty((b,), dtype=torch.long), target_probs.new_empty((b,), dtype=torch.long)

    # key-value cache (csrc/cache/cache_binding.cpp): append and insert write the cache in place
    @fake("mmfm::kv_append")
    def _(cache, new, starts, counts):
        return None

    @fake("mmfm::kv_insert")
    def _(cache, lengths, at, entries):
        return None

    @fake("mmfm::kv_gather_rows")
    def _(cache, rows):
        return cache.new_empty((rows.shape[0], *cache.shape[1:]))

    # decode-time linear layers (csrc/linear/linear_binding.cpp)
    @fake("mmfm::decode_linear")
    def _(x, packed, out_features, rms_add=None, residual=None, generic=False):
        return x.new_empty((x.shape[0], out_features))

    # decode-time attention (csrc/attention/attention_binding.cpp)
    @fake("mmfm::decode_attention")
    def _(q, k, v, prefix, mask=None, generic=False):
        return q.new_empty(q.shape)


def register() -> bool:
    """Registers the fake implementations (once); False when the extension's ops do not exist."""
    if _DONE["registered"]:
        return True
    from mmfm._ext import extension_loaded

    if not extension_loaded():
        return False
    _register_all()
    _DONE["registered"] = True
    return True
