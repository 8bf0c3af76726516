// The one place that declares every mmfm op: torch.ops.mmfm.<name>. The implementations
// are registered per device by each op family's binding (csrc/<family>/*_binding.cpp).
// Keep docs/ops.md in step with these schemas.
#include <Python.h>
#include <torch/library.h>

#include "linear/linear_kernels.h"

TORCH_LIBRARY(mmfm, m) {
  // quantization (csrc/quant)
  m.def("nearest_code(Tensor z, Tensor codebook, int topk=1, bool cosine=False) -> (Tensor indices, Tensor distances)");
  m.def("code_stats(Tensor z, Tensor indices, int num_codes) -> (Tensor sums, Tensor counts)");
  m.def(
      "ema_codebook_update(Tensor cluster_size, Tensor embed_sum, Tensor counts, Tensor sums, float decay, "
      "float eps, float dead_threshold) -> (Tensor cluster_size, Tensor embed_sum, Tensor codebook, Tensor dead)");
  m.def("fsq_quantize(Tensor z, Tensor levels) -> (Tensor codes, Tensor indices)");
  m.def("fsq_indices_to_codes(Tensor indices, Tensor levels) -> Tensor");
  m.def("fsq_codes_to_indices(Tensor codes, Tensor levels) -> Tensor");
  m.def("lfq_quantize(Tensor z) -> (Tensor codes, Tensor indices)");
  m.def("lfq_indices_to_codes(Tensor indices, int dim) -> Tensor");
  m.def("lfq_entropy(Tensor z, float temperature, bool exact) -> Tensor");
  m.def("lfq_entropy_backward(Tensor grad_out, Tensor z, float temperature, bool exact) -> Tensor");
  m.def("residual_vq(Tensor z, Tensor codebooks) -> (Tensor indices, Tensor quantized, Tensor residual_norm)");

  // sampling (csrc/sampling): params [B, 8] fp32 = (temperature, top_k, top_p, min_p, typical_p,
  // repetition_penalty, presence_penalty, frequency_penalty); see docs/ops_sampling.md
  m.def(
      "sample(Tensor logits, Tensor params, Tensor? allowed_range, Tensor? allowed_mask, Tensor? history, int seed, "
      "int offset, Tensor? row_offsets=None) -> (Tensor tokens, Tensor probs)");
  m.def(
      "processed_probs(Tensor logits, Tensor params, Tensor? allowed_range, Tensor? allowed_mask, Tensor? history) "
      "-> Tensor");
  m.def(
      "verify_chain(Tensor target_probs, Tensor draft_probs, Tensor draft_tokens, int seed, int offset) -> "
      "(Tensor accepted, Tensor next_token)");
  m.def(
      "verify_multi_draft(Tensor target_probs, Tensor draft_probs, Tensor candidates, bool replacement, int seed, "
      "int offset) -> (Tensor token, Tensor accepted_index)");

  // key-value cache (csrc/cache): cache [B, H, T, D] contiguous, written in place; int64 row
  // arguments [B]; see docs/ops_cache.md
  m.def("kv_append(Tensor(a!) cache, Tensor new, Tensor starts, Tensor? counts) -> ()");
  m.def("kv_insert(Tensor(a!) cache, Tensor lengths, Tensor at, Tensor entries) -> ()");
  m.def("kv_gather_rows(Tensor cache, Tensor rows) -> Tensor");

  // decode-time linear layers (csrc/linear), CPU only: y = residual + s * (x @ W) for the few rows of a
  // decode step or draft tree, W packed in 16-column panels; see docs/ops_decode.md
  m.def(
      "decode_linear(Tensor x, Tensor packed, int out_features, float? rms_add=None, Tensor? residual=None, "
      "bool generic=False) -> Tensor");
  // decode-time attention (csrc/attention), CPU only: the few new queries of a decode step or draft tree
  // against a cache layer [B, Hkv, T, hd]; keys [0, prefix[b]) for every query plus the new block's by
  // `mask` (None: causal); see docs/ops_decode.md
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor prefix, Tensor? mask=None, bool generic=False) -> Tensor");
}

// `import mmfm._C` loads this library, which runs the registrations above.
static struct PyModuleDef mmfm_c_module = {PyModuleDef_HEAD_INIT, "_C", "mmfm compiled ops (torch.ops.mmfm)", -1,
                                           nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&mmfm_c_module);
  if (mod == nullptr) return nullptr;
#ifdef MMFM_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  // which decode_linear micro-kernel this build compiled (-march decides): benchmarks report it
  PyModule_AddStringConstant(mod, "decode_linear_isa", mmfm::linear::decode_linear_isa());
  return mod;
}
