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

// One pass over the row for its log-sum-exp (and sum, if `want_sum`).
template <typename scalar_t>
inline RowStats<acc_t<scalar_t>> row_stats(const scalar_t* z, int64_t V, bool want_sum) {
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
    for (int64_t j = i; j < cend; j += P::kStep) {
      Vec a, b;
      P::load(z + j, a, b);
      vs = vs + (a - cm).exp_u20() + (b - cm).exp_u20();
      if (want_sum) vz = vz + a + b;
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

// grad[c] = scale * softmax(z)[c] - scale * eps / V, then the target element minus
// scale * (1 - eps). `grad` may alias `z` (the linear + CE chunk buffer is overwritten in place).
template <typename scalar_t>
inline void row_grad(const scalar_t* z, scalar_t* grad, int64_t V, int64_t target, acc_t<scalar_t> lse,
                     acc_t<scalar_t> scale, acc_t<scalar_t> eps) {
  using P = Pair<scalar_t>;
  using acc = typename P::acc;
  using Vec = typename P::Vec;
  const acc off = scale * eps / static_cast<acc>(V);
  const acc z_t = static_cast<acc>(z[target]);  // read before the row is overwritten
  const Vec vlse(lse), vscale(scale), voff(off);
  const int64_t vend = V / P::kStep * P::kStep;
  for (int64_t i = 0; i < vend; i += P::kStep) {
    Vec a, b;
    P::load(z + i, a, b);
    P::store(grad + i, at::vec::fmsub((a - vlse).exp_u20(), vscale, voff),
             at::vec::fmsub((b - vlse).exp_u20(), vscale, voff));
  }
  for (int64_t c = vend; c < V; ++c)
    grad[c] = static_cast<scalar_t>(std::exp(static_cast<acc>(z[c]) - lse) * scale - off);
  // The target element, computed once more in acc so it is rounded only once.
  grad[target] =
      static_cast<scalar_t>(std::exp(z_t - lse) * scale - off - scale * (acc(1) - eps));
}

template <typename scalar_t>
inline void zero_row(scalar_t* grad, int64_t V) {
  std::fill(grad, grad + V, scalar_t(0));
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
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* zr = z + r * V;
      const int64_t t = target[r];
      if (t == ignore_index) {
        if (row_loss) row_loss[r] = 0;
        if (grad) zero_row(grad + r * V, V);
        continue;
      }
      const auto st = row_stats(zr, V, eps != 0);
      if (row_loss) {
        acc loss = st.lse - (acc(1) - eps) * static_cast<acc>(zr[t]);
        if (eps != 0) loss -= eps / static_cast<acc>(V) * st.sumz;
        row_loss[r] = loss;
      }
      if (grad) {
        const acc s = row_scale ? scale * static_cast<acc>(row_scale[r]) : scale;
        row_grad(zr, grad + r * V, V, t, st.lse, s, eps);
      }
    }
  });
}

}  // namespace ce
}  // namespace fastgpt
