// Bindings of the sampling kernels: argument checks, output allocation, dispatch to the CPU
// or (when built with CUDA) the CUDA kernel, and the translation of the kernels' per-row
// status into errors that name the argument and the row. The schemas are declared in
// csrc/bindings.cpp.
//
// Value checks that need the data (NaN logits, parameter ranges, history ids, draft ids) are
// done by the kernels while they read the rows, so they cost no extra pass; the binding reads
// the int32 status vector afterwards (on CUDA this is one small device-to-host copy, which
// synchronises the stream).
#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#include "common/binding.h"
#include "common/checks.h"
#include "sampling/sampling_kernels.h"

namespace mmfm {
namespace sampling {
namespace {

const char* kParamNames[kNumParams] = {"temperature", "top_k",      "top_p",           "min_p",
                                       "typical_p",   "repetition_penalty", "presence_penalty", "frequency_penalty"};
const char* kParamRules[kNumParams] = {"a finite number >= 0 (0 = greedy)",
                                       "an integer >= 0 (0 = off)",
                                       "in [0, 1] (1 = off)",
                                       "in [0, 1] (0 = off)",
                                       "in [0, 1] (1 = off)",
                                       "a finite number > 0 (1 = off)",
                                       "finite (0 = off)",
                                       "finite (0 = off)"};

struct SampleInputs {
  at::Tensor logits, params, range, mask, history;
  SampleArgs args;
};

SampleInputs check_sample_inputs(const char* op, const at::Tensor& logits_, const at::Tensor& params_,
                                 const std::optional<at::Tensor>& range_, const std::optional<at::Tensor>& mask_,
                                 const std::optional<at::Tensor>& history_) {
  check_float(logits_, op, "logits", /*allow_half=*/true);
  check_dim(logits_, 2, op, "logits", "[B, V]");
  check_device_supported(logits_, op, "logits");
  const int64_t B = logits_.size(0), V = logits_.size(1);
  TORCH_CHECK_VALUE(V >= 1, "mmfm.", op, ": argument 'logits' has an empty vocabulary (shape ", logits_.sizes(), ")");
  TORCH_CHECK_VALUE(V < (int64_t(1) << 31), "mmfm.", op, ": argument 'logits' has V=", V, "; at most 2^31 - 1 tokens");
  check_dtype(params_, at::kFloat, op, "params");
  TORCH_CHECK_VALUE(params_.dim() == 2 && params_.size(0) == B && params_.size(1) == kNumParams, "mmfm.", op,
                    ": argument 'params' must have shape [B=", B, ", ", int(kNumParams), "] (temperature, top_k, top_p, "
                    "min_p, typical_p, repetition_penalty, presence_penalty, frequency_penalty), got ",
                    params_.sizes());
  check_same_device(logits_, params_, op, "logits", "params");
  SampleInputs in;
  in.logits = logits_.contiguous();
  in.params = params_.contiguous();
  if (range_.has_value()) {
    check_dtype(*range_, at::kLong, op, "allowed_range");
    TORCH_CHECK_VALUE(range_->dim() == 2 && range_->size(0) == B && range_->size(1) == 2, "mmfm.", op,
                      ": argument 'allowed_range' must have shape [B=", B, ", 2] (lo, hi), got ", range_->sizes());
    check_same_device(logits_, *range_, op, "logits", "allowed_range");
    in.range = range_->contiguous();
  }
  if (mask_.has_value()) {
    check_dtype(*mask_, at::kBool, op, "allowed_mask");
    TORCH_CHECK_VALUE(mask_->sizes() == logits_.sizes(), "mmfm.", op, ": argument 'allowed_mask' must have the shape of "
                      "'logits' ", logits_.sizes(), ", got ", mask_->sizes());
    check_same_device(logits_, *mask_, op, "logits", "allowed_mask");
    in.mask = mask_->contiguous();
  }
  if (history_.has_value()) {
    check_dtype(*history_, at::kLong, op, "history");
    TORCH_CHECK_VALUE(history_->dim() == 2 && history_->size(0) == B, "mmfm.", op,
                      ": argument 'history' must have shape [B=", B, ", L], got ", history_->sizes());
    check_same_device(logits_, *history_, op, "logits", "history");
    in.history = history_->contiguous();
  }
  SampleArgs& a = in.args;
  a.logits = in.logits.data_ptr();
  a.dt = dtype_of(in.logits);
  a.B = B;
  a.V = V;
  a.params = in.params.data_ptr<float>();
  a.allowed_range = in.range.defined() ? in.range.data_ptr<int64_t>() : nullptr;
  a.allowed_mask = in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr;
  a.history = in.history.defined() && in.history.size(1) > 0 ? in.history.data_ptr<int64_t>() : nullptr;
  a.L = in.history.defined() ? in.history.size(1) : 0;
  return in;
}

// Raises for the first row whose status is not kOk.
void raise_sample_status(const char* op, const at::Tensor& status_, const SampleInputs& in) {
  const at::Tensor status = status_.cpu();
  const int32_t* st = status.data_ptr<int32_t>();
  const int64_t B = status.numel();
  int64_t row = 0;
  while (row < B && st[row] == kOk) ++row;
  if (row == B) return;
  const int32_t code = st[row];
  const int64_t V = in.args.V;
  const at::Tensor prm = in.params[row].cpu();
  const float* p = prm.data_ptr<float>();
  if (code >= kBadParam && code < kBadParam + kNumParams) {
    const int c = code - kBadParam;
    TORCH_CHECK_VALUE(false, "mmfm.", op, ": argument '", kParamNames[c], "' must be ", kParamRules[c], ", got ", p[c],
                      " for row ", row);
  }
  switch (code) {
    case kBadLogits:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": argument 'logits' has NaN or +inf in row ", row,
                        "; logits must be finite, or -inf for excluded tokens");
    case kNoToken:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": row ", row, " of 'logits' has no token left to sample: every logit is -inf "
                        "after the penalties and the allowed tokens ('allowed_range' / 'allowed_mask')");
    case kOverflow:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": row ", row, " of 'logits' overflowed to +inf after the penalties and "
                        "'temperature' = ", p[kTemperature], " ('repetition_penalty' = ", p[kRepetitionPenalty],
                        "); use temperature=0 for greedy decoding");
    case kBadHistory:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": argument 'history' has a token id >= V=", V, " in row ", row,
                        "; use negative ids for padding");
    case kBadRange: {
      const at::Tensor r = in.range[row].cpu();
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": argument 'allowed_range' row ", row, " is [", r[0].item<int64_t>(), ", ",
                        r[1].item<int64_t>(), "); it must satisfy 0 <= lo < hi <= V=", V);
    }
    default:
      TORCH_CHECK(false, "mmfm.", op, ": kernel reported status ", code, " for row ", row);
  }
}

std::tuple<at::Tensor, at::Tensor> sample(const at::Tensor& logits, const at::Tensor& params,
                                          const std::optional<at::Tensor>& allowed_range,
                                          const std::optional<at::Tensor>& allowed_mask,
                                          const std::optional<at::Tensor>& history, int64_t seed, int64_t offset,
                                          const std::optional<at::Tensor>& row_offsets) {
  const char* op = "sample";
  SampleInputs in = check_sample_inputs(op, logits, params, allowed_range, allowed_mask, history);
  in.args.seed = static_cast<uint64_t>(seed);
  in.args.offset = static_cast<uint64_t>(offset);
  at::Tensor offsets;   // kept alive until the kernel has run
  if (row_offsets.has_value()) {
    check_dtype(*row_offsets, at::kLong, op, "row_offsets");
    TORCH_CHECK_VALUE(row_offsets->dim() == 1 && row_offsets->size(0) == in.args.B, "mmfm.", op,
                      ": argument 'row_offsets' must have shape [B=", in.args.B, "], got ", row_offsets->sizes());
    check_same_device(logits, *row_offsets, op, "logits", "row_offsets");
    offsets = row_offsets->contiguous();
    in.args.row_offsets = offsets.data_ptr<int64_t>();
  }
  MMFM_DEVICE_GUARD(in.logits);
  const int64_t B = in.args.B;
  at::Tensor tokens = at::empty({B}, in.logits.options().dtype(at::kLong));
  at::Tensor probs = at::empty({B}, in.logits.options().dtype(at::kFloat));
  at::Tensor status = at::empty({B}, in.logits.options().dtype(at::kInt));
  if (B == 0) return {tokens, probs};
#ifdef MMFM_WITH_CUDA
  if (in.logits.is_cuda()) {
    at::Tensor ws = at::empty({sample_workspace_bytes(B, in.args.V)}, in.logits.options().dtype(at::kByte));
    cuda_ok(sample_cuda(in.args, tokens.data_ptr<int64_t>(), probs.data_ptr<float>(), status.data_ptr<int32_t>(),
                        ws.data_ptr(), cuda_stream()),
            op);
    raise_sample_status(op, status, in);
    return {tokens, probs};
  }
#endif
  sample_cpu(in.args, tokens.data_ptr<int64_t>(), probs.data_ptr<float>(), status.data_ptr<int32_t>());
  raise_sample_status(op, status, in);
  return {tokens, probs};
}

at::Tensor processed_probs(const at::Tensor& logits, const at::Tensor& params,
                           const std::optional<at::Tensor>& allowed_range, const std::optional<at::Tensor>& allowed_mask,
                           const std::optional<at::Tensor>& history) {
  const char* op = "processed_probs";
  SampleInputs in = check_sample_inputs(op, logits, params, allowed_range, allowed_mask, history);
  MMFM_DEVICE_GUARD(in.logits);
  const int64_t B = in.args.B, V = in.args.V;
  at::Tensor out = at::empty({B, V}, in.logits.options().dtype(at::kFloat));
  at::Tensor status = at::empty({B}, in.logits.options().dtype(at::kInt));
  if (B == 0) return out;
#ifdef MMFM_WITH_CUDA
  if (in.logits.is_cuda()) {
    at::Tensor ws = at::empty({sample_workspace_bytes(B, V)}, in.logits.options().dtype(at::kByte));
    cuda_ok(processed_probs_cuda(in.args, out.data_ptr<float>(), status.data_ptr<int32_t>(), ws.data_ptr(), cuda_stream()),
            op);
    raise_sample_status(op, status, in);
    return out;
  }
#endif
  processed_probs_cpu(in.args, out.data_ptr<float>(), status.data_ptr<int32_t>());
  raise_sample_status(op, status, in);
  return out;
}

// The checks verify_chain and verify_multi_draft share: two probability tensors of one float
// dtype on one supported device, and a vocabulary V that fits the kernels' int32 token ids.
void check_verify_probs(const char* op, const at::Tensor& target, const at::Tensor& draft_probs, int64_t V) {
  check_float(target, op, "target_probs", true);
  check_float(draft_probs, op, "draft_probs", true);
  check_device_supported(target, op, "target_probs");
  check_same_device(target, draft_probs, op, "target_probs", "draft_probs");
  TORCH_CHECK_TYPE(target.scalar_type() == draft_probs.scalar_type(), "mmfm.", op, ": 'target_probs' (",
                   target.scalar_type(), ") and 'draft_probs' (", draft_probs.scalar_type(),
                   ") must have the same dtype");
  TORCH_CHECK_VALUE(V >= 1 && V < (int64_t(1) << 31), "mmfm.", op, ": 'target_probs' must have 1 <= V < 2^31, got V=",
                    V);
}

// The outputs of a verify op on p's device: two int64 [B] results and the kernels' int32 status.
std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_outputs(const at::Tensor& p, int64_t B) {
  return {at::empty({B}, p.options().dtype(at::kLong)), at::empty({B}, p.options().dtype(at::kLong)),
          at::empty({B}, p.options().dtype(at::kInt))};
}

void raise_verify_status(const char* op, const at::Tensor& status_, const char* draft_arg, int64_t V) {
  const at::Tensor status = status_.cpu();
  const int32_t* st = status.data_ptr<int32_t>();
  const int64_t B = status.numel();
  int64_t row = 0;
  while (row < B && st[row] == kOk) ++row;
  if (row == B) return;
  switch (st[row]) {
    case kBadLogits:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": arguments 'target_probs' / 'draft_probs' have NaN, inf or negative "
                        "values in row ", row, "; they must hold probabilities");
    case kBadProbs:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": row ", row, " of 'target_probs' has no positive mass to draw from");
    case kBadDraft:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": argument '", draft_arg, "' has a token id outside [0, V=", V,
                        ") in row ", row);
    case kDuplicateDraft:
      TORCH_CHECK_VALUE(false, "mmfm.", op, ": argument '", draft_arg, "' repeats a token in row ", row,
                        "; with replacement=False the candidates must be distinct (drawn without replacement)");
    default:
      TORCH_CHECK(false, "mmfm.", op, ": kernel reported status ", st[row], " for row ", row);
  }
}

std::tuple<at::Tensor, at::Tensor> verify_chain(const at::Tensor& target_, const at::Tensor& draft_probs_,
                                                const at::Tensor& draft_tokens_, int64_t seed, int64_t offset) {
  const char* op = "verify_chain";
  check_dtype(draft_tokens_, at::kLong, op, "draft_tokens");
  check_dim(target_, 3, op, "target_probs", "[B, G+1, V]");
  check_dim(draft_probs_, 3, op, "draft_probs", "[B, G, V]");
  check_dim(draft_tokens_, 2, op, "draft_tokens", "[B, G]");
  const int64_t B = target_.size(0), G = draft_tokens_.size(1), V = target_.size(2);
  check_verify_probs(op, target_, draft_probs_, V);
  check_same_device(target_, draft_tokens_, op, "target_probs", "draft_tokens");
  TORCH_CHECK_VALUE(target_.size(1) == G + 1 && draft_probs_.size(0) == B && draft_probs_.size(1) == G &&
                        draft_probs_.size(2) == V && draft_tokens_.size(0) == B,
                    "mmfm.", op, ": shapes must be target_probs [B, G+1, V], draft_probs [B, G, V], draft_tokens [B, G]; "
                    "got ", target_.sizes(), ", ", draft_probs_.sizes(), ", ", draft_tokens_.sizes());
  MMFM_DEVICE_GUARD(target_);
  const at::Tensor p = target_.contiguous(), q = draft_probs_.contiguous(), d = draft_tokens_.contiguous();
  auto [accepted, next, status] = verify_outputs(p, B);
  if (B == 0) return {accepted, next};
#ifdef MMFM_WITH_CUDA
  if (p.is_cuda()) {
    at::Tensor ws = at::empty({verify_workspace_bytes(B, V)}, p.options().dtype(at::kByte));
    cuda_ok(verify_chain_cuda(p.data_ptr(), dtype_of(p), q.data_ptr(), dtype_of(q), d.data_ptr<int64_t>(), B, G, V,
                              static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), accepted.data_ptr<int64_t>(),
                              next.data_ptr<int64_t>(), status.data_ptr<int32_t>(), ws.data_ptr(), cuda_stream()),
            op);
    raise_verify_status(op, status, "draft_tokens", V);
    return {accepted, next};
  }
#endif
  verify_chain_cpu(p.data_ptr(), dtype_of(p), q.data_ptr(), dtype_of(q), d.data_ptr<int64_t>(), B, G, V,
                   static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), accepted.data_ptr<int64_t>(),
                   next.data_ptr<int64_t>(), status.data_ptr<int32_t>());
  raise_verify_status(op, status, "draft_tokens", V);
  return {accepted, next};
}

std::tuple<at::Tensor, at::Tensor> verify_multi_draft(const at::Tensor& target_, const at::Tensor& draft_probs_,
                                                      const at::Tensor& candidates_, bool replacement, int64_t seed,
                                                      int64_t offset) {
  const char* op = "verify_multi_draft";
  check_dtype(candidates_, at::kLong, op, "candidates");
  check_dim(target_, 2, op, "target_probs", "[B, V]");
  check_dim(candidates_, 2, op, "candidates", "[B, K]");
  const int64_t B = target_.size(0), V = target_.size(1), K = candidates_.size(1);
  check_verify_probs(op, target_, draft_probs_, V);
  check_same_device(target_, candidates_, op, "target_probs", "candidates");
  TORCH_CHECK_VALUE(candidates_.size(0) == B, "mmfm.", op, ": 'candidates' must have shape [B=", B, ", K], got ",
                    candidates_.sizes());
  const bool per_draft = draft_probs_.dim() == 3;
  TORCH_CHECK_VALUE((draft_probs_.dim() == 2 && draft_probs_.size(0) == B && draft_probs_.size(1) == V) ||
                        (per_draft && draft_probs_.size(0) == B && draft_probs_.size(1) == K &&
                         draft_probs_.size(2) == V),
                    "mmfm.", op, ": argument 'draft_probs' must have shape [B, V] = [", B, ", ", V, "] or [B, K, V] = [",
                    B, ", ", K, ", ", V, "], got ", draft_probs_.sizes());
  TORCH_CHECK_VALUE(!(per_draft && !replacement), "mmfm.", op, ": per-draft 'draft_probs' [B, K, V] needs "
                    "replacement=True (drafts from different distributions are independent draws)");
  MMFM_DEVICE_GUARD(target_);
  const at::Tensor p = target_.contiguous(), q = draft_probs_.contiguous(), c = candidates_.contiguous();
  auto [token, index, status] = verify_outputs(p, B);
  if (B == 0) return {token, index};
#ifdef MMFM_WITH_CUDA
  if (p.is_cuda()) {
    at::Tensor ws = at::empty({verify_workspace_bytes(B, V)}, p.options().dtype(at::kByte));
    cuda_ok(verify_multi_draft_cuda(p.data_ptr(), dtype_of(p), q.data_ptr(), dtype_of(q), per_draft,
                                    c.data_ptr<int64_t>(), B, K, V, replacement, static_cast<uint64_t>(seed),
                                    static_cast<uint64_t>(offset), token.data_ptr<int64_t>(),
                                    index.data_ptr<int64_t>(), status.data_ptr<int32_t>(), ws.data_ptr(), cuda_stream()),
            op);
    raise_verify_status(op, status, "candidates", V);
    return {token, index};
  }
#endif
  verify_multi_draft_cpu(p.data_ptr(), dtype_of(p), q.data_ptr(), dtype_of(q), per_draft, c.data_ptr<int64_t>(), B, K,
                         V, replacement, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                         token.data_ptr<int64_t>(), index.data_ptr<int64_t>(), status.data_ptr<int32_t>());
  raise_verify_status(op, status, "candidates", V);
  return {token, index};
}

void register_impls(torch::Library& m) {
  m.impl("sample", &sample);
  m.impl("processed_probs", &processed_probs);
  m.impl("verify_chain", &verify_chain);
  m.impl("verify_multi_draft", &verify_multi_draft);
}

}  // namespace
}  // namespace sampling
}  // namespace mmfm

MMFM_REGISTER_CPU_AND_CUDA(mmfm::sampling::register_impls)
