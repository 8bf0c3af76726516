// Raw-pointer entry points of the sampling kernels (fused logits processing, sampling and
// lossless speculative verification).
//
// Every kernel exists twice with the same contract: `*_cpu` (sampling/*_cpu.cpp, OpenMP over
// rows) and `*_cuda` (sampling/*_cuda.cu, one thread block per row, launched on `stream`, a
// cudaStream_t passed as void*). The binding (sampling/sampling_binding.cpp) checks shapes,
// dtypes and devices, makes tensors contiguous and calls these; nothing here includes torch.
//
// Processing of one row of logits z [V] (the order is part of the contract; docs/ops_sampling.md):
//   1. penalties: every token t seen c_t > 0 times in the row's history (entries < 0 are
//      padding) gets z_t <- (z_t < 0 ? z_t * r : z_t / r) - f * c_t - p   (sampling_common.h)
//   2. allowed tokens: outside [lo, hi) of allowed_range, or where allowed_mask is false,
//      z_t <- -inf
//   3. temperature T: T == 0 is greedy: the token is the first index of max z (prob 1) and
//      steps 4-8 are skipped. Otherwise s = z * fp32(1 / T).
//   Let m = max s. Weights w_i = exp(s_i - m); tokens with s_i = -inf are never kept. The kept
//   set K starts as all tokens with finite s; each step below shrinks it, renormalising:
//   4. top-k (k >= 1): keep s_i >= the k-th largest s in K (counted with multiplicity):
//      ties with the k-th value are all kept. k == 0 or k >= |K| keeps all.
//   5. top-p (p < 1): keep s_i >= v, v the largest s_j in K with sum_{i in K, s_i >= s_j} w_i
//      >= p * sum_{i in K} w_i: the smallest prefix by descending probability whose mass
//      reaches p, extended to every token tied with its last one. p == 1 keeps all, p == 0
//      keeps the tokens tied at the maximum.
//   6. min-p (mp > 0): keep s_i >= fp32(double(m) + log(double(mp))), i.e. p_i >= mp * p_max.
//   7. typical (tau < 1), over the renormalised q on K: mu = sum q_i s_i, key_i =
//      -|s_i - mu| (= -|-log q_i - H(q)|, since -log q_i - H = mu - s_i); keep key_i >= v,
//      v the largest key in K whose superlevel mass reaches tau * sum_K w (as top-p, on key).
//   8. draw: u from Philox(seed, offset, row, sub 0), token = the first i in index order with
//      kept prefix sum of w > u * sum_K w (inverse CDF). prob = w_token / sum_K w.
// No step sorts the vocabulary: top-k is a selection by a streaming threshold filter (CPU) or
// by pivot bisection (CUDA), top-p and typical by multi-pivot bisection on the key with
// compaction, finished by sorting at most a few hundred candidates.
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace mmfm {
namespace sampling {

// Columns of the per-row parameter matrix params [B, kNumParams] (fp32).
enum Param : int {
  kTemperature = 0,        // >= 0; 0 = greedy
  kTopK = 1,               // integer >= 0; 0 = off
  kTopP = 2,               // [0, 1]; 1 = off
  kMinP = 3,               // [0, 1]; 0 = off
  kTypicalP = 4,           // [0, 1]; 1 = off
  kRepetitionPenalty = 5,  // > 0; 1 = off
  kPresencePenalty = 6,    // finite; 0 = off
  kFrequencyPenalty = 7,   // finite; 0 = off
  kNumParams = 8
};

// Per-row status written by every kernel (int32 [B]); the binding turns the first non-zero
// one into an error naming the argument. Rows with a non-zero status get token -1.
enum Status : int32_t {
  kOk = 0,
  kBadLogits = 1,    // NaN or +inf in the row (logits), or NaN, inf or < 0 in a probability row read
  kNoToken = 2,      // every logit is -inf after penalties and the allowed-token mask
  kOverflow = 3,     // a penalised or temperature-scaled logit overflowed to +inf
  kBadHistory = 4,   // a history entry >= V
  kBadRange = 5,     // allowed_range row not 0 <= lo < hi <= V
  kBadProbs = 6,     // verification: a distribution needed for a draw has no positive mass
  kBadDraft = 7,     // verification: a draft / candidate token outside [0, V)
  kDuplicateDraft = 8,  // multi-draft without replacement: a candidate repeats in the row
  kBadParam = 16,    // kBadParam + column: that parameter is out of its range in this row
};

struct SampleArgs {
  const void* logits = nullptr;  // [B, V] of type dt
  DType dt = DType::F32;
  int64_t B = 0, V = 0;          // V < 2^31
  const float* params = nullptr;           // [B, kNumParams]
  const int64_t* allowed_range = nullptr;  // [B, 2] (lo, hi) or null
  const bool* allowed_mask = nullptr;      // [B, V] (true = allowed) or null
  const int64_t* history = nullptr;        // [B, L] token ids, entries < 0 ignored, or null
  int64_t L = 0;
  uint64_t seed = 0, offset = 0;
  // [B] per-row offsets, or null. Null: row r draws with Philox(seed, offset, r, sub 0). Given:
  // row r draws with Philox(seed, row_offsets[r], 0, sub 0), the uniform a one-row call with
  // offset = row_offsets[r] uses, so rows that stand for positions of one sequence (the nodes
  // of a draft tree, keyed by position) draw what one-token steps at those positions would.
  const int64_t* row_offsets = nullptr;
};

// tokens [B] int64, probs [B] fp32 (probability of the token under the processed
// distribution), status [B].
void sample_cpu(const SampleArgs& a, int64_t* tokens, float* probs, int32_t* status);
// out [B, V] fp32: the processed distribution (one-hot at the argmax for T == 0).
void processed_probs_cpu(const SampleArgs& a, float* out, int32_t* status);

// Chain speculative verification. p [B, G+1, V] (target), q [B, G, V] (draft), draft [B, G]
// token ids in [0, V) (checked by the caller). For j = 0..G-1 with (u0, u1) = Philox(seed,
// offset, row, sub j): accept draft x = draft[j] iff u0 * q_j(x) < p_j(x) (i.e. with
// probability min(1, p/q)); on the first rejection draw with u1 from max(0, p_j - q_j) (from
// p_j if that has no mass) and stop. After G acceptances draw from p_G with u0 of sub G.
// Rows of p and q are used as given (they should sum to 1); draws normalise by the row sum.
// accepted [B] = number of accepted drafts, next_token [B] = the drawn token.
void verify_chain_cpu(const void* p, DType pdt, const void* q, DType qdt, const int64_t* draft, int64_t B, int64_t G,
                      int64_t V, uint64_t seed, uint64_t offset, int64_t* accepted, int64_t* next_token,
                      int32_t* status);

// Multi-draft verification by recursive rejection sampling at one position. p [B, V] target,
// q [B, V] (shared by the K drafts) or [B, K, V] (q_per_draft, with replacement only),
// cand [B, K] candidate ids in [0, V). r_0 = p. For i = 0..K-1 with (u0, _) = Philox(seed,
// offset, row, sub i): q_i = q (replacement) or q with cand[0..i-1] removed and renormalised
// (without replacement); accept cand[i] iff u0 * q_i(x) * R_i < r_i(x), where R_i = sum r_i;
// else r_{i+1} = max(0, r_i - R_i q_i) (unnormalised). If every candidate is rejected, draw
// from r_K with u0 of sub K. token [B]; accepted_index [B] = i of the accepted candidate or -1.
void verify_multi_draft_cpu(const void* p, DType pdt, const void* q, DType qdt, bool q_per_draft, const int64_t* cand,
                            int64_t B, int64_t K, int64_t V, bool replacement, uint64_t seed, uint64_t offset,
                            int64_t* token, int64_t* accepted_index, int32_t* status);

// CUDA versions. `workspace` is device memory of at least *_workspace_bytes(...) bytes.
// They return a cudaError_t as int (0 = success).
int64_t sample_workspace_bytes(int64_t B, int64_t V);
int sample_cuda(const SampleArgs& a, int64_t* tokens, float* probs, int32_t* status, void* workspace, void* stream);
int processed_probs_cuda(const SampleArgs& a, float* out, int32_t* status, void* workspace, void* stream);
int64_t verify_workspace_bytes(int64_t B, int64_t V);
int verify_chain_cuda(const void* p, DType pdt, const void* q, DType qdt, const int64_t* draft, int64_t B, int64_t G,
                      int64_t V, uint64_t seed, uint64_t offset, int64_t* accepted, int64_t* next_token,
                      int32_t* status, void* workspace, void* stream);
int verify_multi_draft_cuda(const void* p, DType pdt, const void* q, DType qdt, bool q_per_draft, const int64_t* cand,
                            int64_t B, int64_t K, int64_t V, bool replacement, uint64_t seed, uint64_t offset,
                            int64_t* token, int64_t* accepted_index, int32_t* status, void* workspace, void* stream);

}  // namespace sampling
}  // namespace mmfm
