// Cross-entropy row kernels shared by cross_entropy.cpp and linear_cross_entropy.cpp.
//
// Per row z of V logits with target t (label smoothing eps):
//   lse  = log(sum_c exp(z_c))                       one online pass (running max and sum)
//   loss = lse - (1 - eps) * z_t - eps/V * sum_c z_c
//   grad = scale * (softmax(z) - (1 - eps) * onehot(t) - eps/V)     one more pass, written out
// `scale` folds in the reduction (1/#valid rows for "mean"), so the gradient buffer is ready to be
// multiplied by grad_output in the backward. Rows whose target is ignore_index get loss 0 and a
// zero gradient row.
#pragma once

#include "common.h"
#include "output_memory.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>

namespace fastgpt {
namespace ce {

using at::vec::Vectorized;

// Reductions, numbered as torch's at::Reduction: none 0, mean 1, sum 2.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Loads and stores two acc vectors at a time, so that bf16/fp16 (whose natural vector holds twice
// as many elements as a float vector) and fp32/fp64 share one loop.
template <typename scalar_t>
struct Pair {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  static constexpr int64_t kStep = 2 * Vec::size();
  static inline void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (is_reduced_v<scalar_t>) {
      at::vec::load_to_float<scalar_t>(p, a, b);
    } else {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    }
  }
  static inline void store(scalar_t* p, const Vec& a, const Vec& b) {
    if constexpr (is_reduced_v<scalar_t>) {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    } else {
      a.store(p);
      b.store(p + Vec::size());
    }
  }
};

template <typename acc>
struct RowStats {
  acc lse;   // log-sum-exp of the row
  acc sumz;  // sum of the row (only when label smoothing asks for it)
};

// Elements per step of the online pass: the chunk's max is found first (cheap compares on data
// then in L1), the running sum rescaled once per chunk and lane, then exp(z - max) summed. That
// costs ~1 exp per element, where a per-element online update costs 2.
constexpr int64_t kChunkSteps = 8;

// Chunks of the vectorized part of a row of V elements.
template <typename scalar_t>
inline int64_t num_chunks(int64_t V) {
  constexpr int64_t kChunk = kChunkSteps * Pair<scalar_t>::kStep;
  return (V / Pair<scalar_t>::kStep * Pair<scalar_t>::kStep + kChunk - 1) / kChunk;
}

// One pass over the row for its log-sum-exp (and sum, if `want_sum`). With `e_out`, it also
// stores e = exp(z - m) for the vectorized part, m being each lane's running max after the chunk
// (saved in `chunk_max`, one vector per chunk): softmax is then e * exp(m - lse), one multiply
// per element instead of a second exp. `e_out` may alias `z` (fp32/fp64 in place).
template <typename scalar_t>
inline RowStats<acc_t<scalar_t>> row_stats(const scalar_t* z, int64_t V, bool want_sum,
                                           acc_t<scalar_t>* e_out = nullptr,
                                           acc_t<scalar_t>* chunk_max = nullptr) {
  using P = Pair<scalar_t>;
  using acc = typename P::acc;
  using Vec = typename P::Vec;
  constexpr int64_t L = Vec::size();
  const int64_t vend = V / P::kStep * P::kStep;
  // Lane-wise running max and sum. The max starts at the lowest finite value, not -inf, so that
  // rescaling by exp(old - new) never computes -inf - -inf for rows of -inf logits.
  Vec vm(std::numeric_limits<acc>::lowest()), vs(0), vz(0);
  for (int64_t i = 0; i < vend; i += kChunkSteps * P::kStep) {
    const int64_t cend = std::min(vend, i + kChunkSteps * P::kStep);
    Vec cm = vm;
    for (int64_t j = i; j < cend; j += P::kStep) {
      Vec a, b;
      P::load(z + j, a, b);
      cm = at::vec::maximum(cm, at::vec::maximum(a, b));
    }
    vs = vs * (vm - cm).exp_u20();
    vm = cm;
    if (e_out) {
      cm.store(chunk_max + i / (kChunkSteps * P::kStep) * L);
      for (int64_t j = i; j < cend; j += P::kStep) {
        Vec a, b;
        P::load(z + j, a, b);
        if (want_sum) vz = vz + a + b;
        const Vec ea = (a - cm).exp_u20(), eb = (b - cm).exp_u20();
        vs = vs + ea + eb;
        ea.store(e_out + j);
        eb.store(e_out + j + L);
      }
    } else {
      for (int64_t j = i; j < cend; j += P::kStep) {
        Vec a, b;
        P::load(z + j, a, b);
        vs = vs + (a - cm).exp_u20() + (b - cm).exp_u20();
        if (want_sum) vz = vz + a + b;
      }
    }
  }
  // Merge the lanes and the scalar tail.
  acc lm[L], ls[L];
  vm.store(lm);
  vs.store(ls);
  acc m = std::numeric_limits<acc>::lowest();
  for (int64_t l = 0; l < L; ++l) m = std::max(m, lm[l]);
  for (int64_t c = vend; c < V; ++c) m = std::max(m, static_cast<acc>(z[c]));
  acc s = 0;
  for (int64_t l = 0; l < L; ++l) s += ls[l] * std::exp(lm[l] - m);
  acc sumz = want_sum ? hsum(vz) : acc(0);
  for (int64_t c = vend; c < V; ++c) {
    const acc v = static_cast<acc>(z[c]);
    s += std::exp(v - m);
    sumz += v;
  }
  return {m + std::log(s), sumz};
}

// The gradient row from the e and chunk maxima row_stats stored, that is
// grad[c] = scale * softmax(z)[c] - scale * eps / V, the target element minus scale * (1 - eps):
// softmax = e * exp(m_chunk - lse), one vector exp per chunk. `z` is read only for the scalar
// tail and `z_t`, the target logit read before anything was overwritten.
template <typename scalar_t>
inline void row_grad_from_e(const scalar_t* z, const acc_t<scalar_t>* e,
                            const acc_t<scalar_t>* chunk_max, scalar_t* grad, int64_t V,
                            int64_t target, acc_t<scalar_t> z_t, acc_t<scalar_t> lse,
                            acc_t<scalar_t> scale, acc_t<scalar_t> eps) {
  using P = Pair<scalar_t>;
  using acc = typename P::acc;
  using Vec = typename P::Vec;
  constexpr int64_t L = Vec::size();
  const acc off = scale * eps / static_cast<acc>(V);
  const Vec vlse(lse), vscale(scale), voff(off);
  const int64_t vend = V / P::kStep * P::kStep;
  for (int64_t i = 0; i < vend; i += kChunkSteps * P::kStep) {
    const int64_t cend = std::min(vend, i + kChunkSteps * P::kStep);
    const Vec f = (Vec::loadu(chunk_max + i / (kChunkSteps * P::kStep) * L) - vlse).exp_u20() *
                  vscale;
    for (int64_t j = i; j < cend; j += P::kStep) {
      P::store(grad + j, at::vec::fmsub(Vec::loadu(e + j), f, voff),
               at::vec::fmsub(Vec::loadu(e + j + L), f, voff));
    }
  }
  for (int64_t c = vend; c < V; ++c)
    grad[c] = static_cast<scalar_t>(std::exp(static_cast<acc>(z[c]) - lse) * scale - off);
  grad[target] =
      static_cast<scalar_t>(std::exp(z_t - lse) * scale - off - scale * (acc(1) - eps));
}

template <typename scalar_t>
inline void zero_row(scalar_t* grad, int64_t V) {
  std::fill(grad, grad + V, scalar_t(0));
}

// A fresh (rows, V) gradient buffer. The first write to a new page of a large allocation faults
// in the kernel, and at GPT-2's 4096 x 50257 fp32 (823 MB, 200K small pages) that costs more than
// the arithmetic: large buffers are advised as transparent huge pages (output_memory.h, 512x fewer
// faults) and, once freed, kept for the next gradient of that size. Still an ordinary tensor.
inline at::Tensor empty_grad_buffer(int64_t rows, int64_t V, const at::TensorOptions& opts) {
  return empty_output({rows, V}, opts);
}

// Validates the targets (never reading a logit out of bounds) and counts the non-ignored ones.
inline int64_t count_valid_targets(const at::Tensor& target, int64_t V, int64_t ignore_index,
                                   const char* op) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t i = 0; i < target.numel(); ++i) {
    if (t[i] == ignore_index) continue;
    TORCH_CHECK(t[i] >= 0 && t[i] < V, op, ": target ", t[i], " at row ", i,
                " is out of range [0, ", V, ") and is not ignore_index (", ignore_index, ")");
    ++valid;
  }
  return valid;
}

// Loss and (optionally) gradient of rows [0, N) of z, in parallel over rows.
//   row_loss: (N,) acc losses (0 for ignored rows); grad: (N, V) or nullptr; scale: per-call
//   gradient scale, times row_scale[i] when row_scale is given (the 'none' reduction's backward).
template <typename scalar_t>
void rows_loss_grad(const scalar_t* z, const int64_t* target, int64_t N, int64_t V,
                    int64_t ignore_index, acc_t<scalar_t> eps, acc_t<scalar_t> scale,
                    const scalar_t* row_scale, acc_t<scalar_t>* row_loss, scalar_t* grad) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  // Per-thread scratch, allocated once per call: the chunk maxima of a row and, for bf16/fp16,
  // the fp32 e row (fp32/fp64 store e straight into the gradient row, which it then overwrites).
  const int64_t max_len = num_chunks<scalar_t>(V) * Vec::size();
  const int64_t e_len = is_reduced_v<scalar_t> ? V : 0;
  const int64_t per_thread = max_len + e_len;
  at::Tensor scratch;
  if (grad) {
    scratch = at::empty({at::get_num_threads(), per_thread},
                        at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value));
  }
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    acc* chunk_max = grad ? scratch.data_ptr<acc>() + at::get_thread_num() * per_thread : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* zr = z + r * V;
      const int64_t t = target[r];
      if (t == ignore_index) {
        if (row_loss) row_loss[r] = 0;
        if (grad) zero_row(grad + r * V, V);
        continue;
      }
      const acc z_t = static_cast<acc>(zr[t]);  // before grad (maybe z itself) is written
      acc* e = nullptr;
      if (grad) {
        if constexpr (is_reduced_v<scalar_t>) {
          e = chunk_max + max_len;
        } else {
          e = grad + r * V;
        }
      }
      const auto st = row_stats(zr, V, eps != 0, e, chunk_max);
      if (row_loss) {
        acc loss = st.lse - (acc(1) - eps) * z_t;
        if (eps != 0) loss -= eps / static_cast<acc>(V) * st.sumz;
        row_loss[r] = loss;
      }
      if (grad) {
        const acc s = row_scale ? scale * static_cast<acc>(row_scale[r]) : scale;
        row_grad_from_e(zr, e, chunk_max, grad + r * V, V, t, z_t, st.lse, s, eps);
      }
    }
  });
}

}  // namespace ce
}  // namespace fastgpt
