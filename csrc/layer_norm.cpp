// LayerNorm over the last dim of a contiguous (M, N) tensor, with an optional fused residual add.
//
// Forward: one task per block of rows. Each row is read from memory once (the pass that also
// sums it and, fused, writes x + r), then two short passes over it while it is still in L1
// (centred variance, normalise). Statistics are accumulated in fp32 (double for float64 inputs)
// and saved for the backward.
// Backward: one pass over the rows computes dx (plus the gradient of the fused sum output, in
// the same store) and per-thread partials of dweight and dbias, which are summed across threads
// at the end (no atomics, deterministic for a fixed thread count).
//
// Every loop walks a row in chunks of two acc vectors (see Chunk): bf16/fp16 are widened as they
// are loaded and rounded once as they are stored, so no pass needs an fp32 copy of a row, and
// reductions keep four independent accumulators (two chunks in flight) so they are not bound by
// the latency of one chain of adds. The rows are short (768-1600): that latency, not memory,
// bounded the bf16 kernels and the in-cache fp32 ones.
//
// Large shapes (GPT-2 training: 8192 x 768-1600) are memory- and page-fault-bound instead. Their
// outputs are advised for huge pages before the first store (output_memory.h) and, past 8 MiB,
// written with non-temporal stores (stream_output), so each output byte crosses the memory bus
// once. fwd+bwd then moves 5 row-sets (LN) and 8 (add_LN) against eager's 7 and 14 (counting its
// write-allocates); those ratios, 1.4x and 1.75x, bound the speed-up where neither side faults.
#include "chunk.h"
#include "common.h"
#include "output_memory.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <cmath>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fastgpt {
namespace {

using at::vec::Vectorized;

// Whether a kernel writes its (M, n) output `out` with non-temporal stores. Only large outputs:
// LayerNorm is memory-bound there (fp32 8192x768: ~8 GB/s a core), and the read-for-ownership
// of each output line is a third of the forward's traffic and a quarter of the backward's;
// streaming cut the fp32 fwd 1.1-1.5x and fwd+bwd 1.2-1.3x (1 thread, no page faults). Such an
// output (>= 8 MiB, 4x a core's L2) would mostly have left the cache before its consumer reads
// it; a small one stays cached for the next op. Streamed only where every chunk is aligned, and
// never a row the kernel reads back (the fused sum is normalised right after it is written: it
// is stored normally).
inline bool stream_output(const at::Tensor& out, int64_t n, int64_t chunk_bytes) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const int64_t row_bytes = n * static_cast<int64_t>(out.element_size());
  const auto base = reinterpret_cast<uintptr_t>(out.const_data_ptr());
  return out.nbytes() >= (size_t(8) << 20) && row_bytes % chunk_bytes == 0 &&
         base % std::min<int64_t>(chunk_bytes, 64) == 0;
#else
  (void)out, (void)n, (void)chunk_bytes;
  return false;
#endif
}

// Orders a thread's streamed stores before the results are handed on.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Runs body(i, accumulators) over the whole chunks of a row of n, alternating two sets of
// accumulators so consecutive chunks do not wait on each other's adds; returns both sets and
// the index where the scalar tail starts.
template <int64_t C, typename Acc, typename Body>
inline int64_t over_chunks(int64_t n, Acc& a0, Acc& a1, Body&& body) {
  int64_t i = 0;
  for (; i + 2 * C <= n; i += 2 * C) {
    body(i, a0);
    body(i + C, a1);
  }
  if (i + C <= n) {
    body(i, a0);
    i += C;
  }
  return i;
}

// A pair of vector accumulators, one per half of a chunk.
template <typename acc>
struct Acc2 {
  Vectorized<acc> lo{acc(0)}, hi{acc(0)};
};

// Widens an optional (N,) parameter to acc once for all rows (a no-op for fp32/fp64).
template <typename scalar_t>
const acc_t<scalar_t>* param_as_acc(const at::Tensor& p, at::Tensor& holder) {
  if (!p.defined()) return nullptr;
  if constexpr (is_reduced_v<scalar_t>) {
    holder = at::empty({p.numel()}, p.options().dtype(at::kFloat));
    widen_row(p.const_data_ptr<scalar_t>(), holder.data_ptr<float>(), p.numel());
    return holder.const_data_ptr<float>();
  } else {
    return p.const_data_ptr<scalar_t>();
  }
}

// Passes 2 and 3 of a forward row, over `in` (the row LayerNorm sees, already in L1: scalar_t
// for a plain LayerNorm, the acc scratch row for the fused add) given its sum; writes y (streamed
// when nt) and returns (mean, rstd).
template <typename scalar_t, typename in_t>
inline std::pair<acc_t<scalar_t>, acc_t<scalar_t>> normalize_row(
    const in_t* in, acc_t<scalar_t> sum, const acc_t<scalar_t>* w, const acc_t<scalar_t>* b,
    scalar_t* yr, int64_t n, acc_t<scalar_t> eps, bool nt) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  using In = Chunk<in_t>;
  using Out = Chunk<scalar_t>;
  constexpr int64_t C = Out::size;
  static_assert(In::size == C);
  const acc mean = sum / n;

  // Pass 2: centred (biased) variance; subtracting the mean first keeps full precision when
  // |mean| >> std.
  const Vec vmean(mean);
  Acc2<acc> q0, q1;
  int64_t t = over_chunks<C>(n, q0, q1, [&](int64_t i, Acc2<acc>& a) {
    Vec lo, hi;
    In::load(in + i, lo, hi);
    lo = lo - vmean;
    hi = hi - vmean;
    a.lo = at::vec::fmadd(lo, lo, a.lo);
    a.hi = at::vec::fmadd(hi, hi, a.hi);
  });
  acc sq = hsum((q0.lo + q0.hi) + (q1.lo + q1.hi));
  for (int64_t i = t; i < n; ++i) {
    const acc d = static_cast<acc>(in[i]) - mean;
    sq += d * d;
  }
  const acc rstd = acc(1) / std::sqrt(sq / n + eps);

  // Pass 3: y = (x - mean) * rstd * w + b, rounded once.
  const Vec vrstd(rstd);
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  for (; i + C <= n; i += C) {
    Vec lo, hi;
    In::load(in + i, lo, hi);
    lo = (lo - vmean) * vrstd;
    hi = (hi - vmean) * vrstd;
    if (w) {
      lo = lo * Vec::loadu(w + i);
      hi = hi * Vec::loadu(w + i + W);
    }
    if (b) {
      lo = lo + Vec::loadu(b + i);
      hi = hi + Vec::loadu(b + i + W);
    }
    if (nt) {
      Out::stream(yr + i, lo, hi);
    } else {
      Out::store(yr + i, lo, hi);
    }
  }
  for (; i < n; ++i) {
    acc v = (static_cast<acc>(in[i]) - mean) * rstd;
    if (w) v *= w[i];
    if (b) v += b[i];
    yr[i] = static_cast<scalar_t>(v);
  }
  return {mean, rstd};
}

// One row of LayerNorm: pass 1 reads x from memory and sums it; passes 2-3 re-read it from L1.
template <typename scalar_t>
inline std::pair<acc_t<scalar_t>, acc_t<scalar_t>> layer_norm_row(
    const scalar_t* xr, const acc_t<scalar_t>* w, const acc_t<scalar_t>* b, scalar_t* yr,
    int64_t n, acc_t<scalar_t> eps, bool nt) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  using Ch = Chunk<scalar_t>;
  Acc2<acc> s0, s1;
  const int64_t t = over_chunks<Ch::size>(n, s0, s1, [&](int64_t i, Acc2<acc>& a) {
    Vec lo, hi;
    Ch::load(xr + i, lo, hi);
    a.lo = a.lo + lo;
    a.hi = a.hi + hi;
  });
  acc sum = hsum((s0.lo + s0.hi) + (s1.lo + s1.hi));
  for (int64_t i = t; i < n; ++i) sum += static_cast<acc>(xr[i]);
  return normalize_row<scalar_t>(xr, sum, w, b, yr, n, eps, nt);
}

// One row of add + LayerNorm. Pass 1 reads x and r, writes s = x + r rounded to scalar_t (as
// eager `x + r` does; streamed when nt_sum) and keeps those rounded values in the acc scratch
// row buf, which passes 2-3 normalise: the result matches layer_norm(x + r) exactly, and the
// sum need not be read back from the output (a streamed line is no longer in cache).
template <typename scalar_t>
inline std::pair<acc_t<scalar_t>, acc_t<scalar_t>> add_layer_norm_row(
    const scalar_t* xr, const scalar_t* rr, scalar_t* sr, acc_t<scalar_t>* buf,
    const acc_t<scalar_t>* w, const acc_t<scalar_t>* b, scalar_t* yr, int64_t n,
    acc_t<scalar_t> eps, bool nt_sum, bool nt) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  using Ch = Chunk<scalar_t>;
  Acc2<acc> s0, s1;
  const int64_t t = over_chunks<Ch::size>(n, s0, s1, [&](int64_t i, Acc2<acc>& a) {
    Vec lo, hi, rlo, rhi;
    Ch::load(xr + i, lo, hi);
    Ch::load(rr + i, rlo, rhi);
    lo = lo + rlo;
    hi = hi + rhi;
    if (nt_sum) {
      Ch::stream(sr + i, lo, hi);
      Ch::round(lo, hi);
    } else {
      Ch::store_rounded(sr + i, lo, hi);
    }
    lo.store(buf + i);
    hi.store(buf + i + Vec::size());
    a.lo = a.lo + lo;
    a.hi = a.hi + hi;
  });
  acc sum = hsum((s0.lo + s0.hi) + (s1.lo + s1.hi));
  for (int64_t i = t; i < n; ++i) {
    sr[i] = static_cast<scalar_t>(static_cast<acc>(xr[i]) + static_cast<acc>(rr[i]));
    buf[i] = static_cast<acc>(sr[i]);
    sum += buf[i];
  }
  return normalize_row<scalar_t>(buf, sum, w, b, yr, n, eps, nt);
}

template <typename scalar_t>
void layer_norm_fwd_kernel(const at::Tensor& x, const at::Tensor& residual,
                           const at::Tensor& weight, const at::Tensor& bias, double eps,
                           at::Tensor& y, at::Tensor& summed, at::Tensor& mean,
                           at::Tensor& rstd) {
  using acc = acc_t<scalar_t>;
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor w_holder, b_holder;
  const acc* w = param_as_acc<scalar_t>(weight, w_holder);
  const acc* b = param_as_acc<scalar_t>(bias, b_holder);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  scalar_t* sp = summed.defined() ? summed.data_ptr<scalar_t>() : nullptr;
  acc* meanp = mean.data_ptr<acc>();
  acc* rstdp = rstd.data_ptr<acc>();

  constexpr int64_t chunk_bytes = Chunk<scalar_t>::size * sizeof(scalar_t);
  const bool nt = stream_output(y, N, chunk_bytes);
  const bool nt_sum = rp && stream_output(summed, N, chunk_bytes);
  // The fused add's per-thread scratch row (the rounded sum in acc).
  at::Tensor scratch = at::empty({rp ? at::get_num_threads() : 0, N},
                                 x.options().dtype(c10::CppTypeToScalarType<acc>::value));
  const acc ep = static_cast<acc>(eps);
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    acc* buf = rp ? scratch.data_ptr<acc>() + at::get_thread_num() * N : nullptr;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t off = row * N;
      auto [mu, rs] = rp ? add_layer_norm_row<scalar_t>(xp + off, rp + off, sp + off, buf, w, b,
                                                        yp + off, N, ep, nt_sum, nt)
                         : layer_norm_row<scalar_t>(xp + off, w, b, yp + off, N, ep, nt);
      meanp[row] = mu;
      rstdp[row] = rs;
    }
    if (nt) stream_fence();
  });
}

// Sums of one backward row: g = dy * w (or dy), s1 = sum(g), s2 = sum(g * xhat).
template <typename acc>
struct BwdSums {
  Vectorized<acc> s1lo{acc(0)}, s1hi{acc(0)}, s2lo{acc(0)}, s2hi{acc(0)};
};

template <typename scalar_t>
void layer_norm_bwd_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& rstd, const at::Tensor& weight,
                           const at::Tensor& dresidual, bool weight_grad, bool bias_grad,
                           at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  using Ch = Chunk<scalar_t>;
  constexpr int64_t C = Ch::size;
  constexpr int64_t W = Vec::size();
  constexpr bool reduced = is_reduced_v<scalar_t>;
  const int64_t M = x.size(0), N = x.size(1);
  const int nthreads = at::get_num_threads();
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc>::value);
  at::Tensor w_holder;
  const acc* w = param_as_acc<scalar_t>(weight, w_holder);
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* drp = dresidual.defined() ? dresidual.const_data_ptr<scalar_t>() : nullptr;
  const acc* meanp = mean.const_data_ptr<acc>();
  const acc* rstdp = rstd.const_data_ptr<acc>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();

  // Per-thread partial sums of dweight and dbias, zeroed once.
  const bool partials = weight_grad || bias_grad;
  at::Tensor part = partials ? at::zeros({nthreads, 2 * N}, acc_opts) : at::Tensor();
  const bool nt = stream_output(dx, N, C * sizeof(scalar_t));

  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    acc* dw_part = partials ? part.data_ptr<acc>() + tid * 2 * N : nullptr;
    acc* db_part = partials ? dw_part + N : nullptr;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* g_row = dyp + row * N;
      const scalar_t* x_row = xp + row * N;
      const acc mu = meanp[row], rs = rstdp[row];
      const Vec vmu(mu), vrs(rs);
      // Pass 1, from memory: s1, s2 and the weight/bias partials (dw += dy * xhat, db += dy).
      BwdSums<acc> a0, a1;
      const int64_t t = over_chunks<C>(N, a0, a1, [&](int64_t i, BwdSums<acc>& a) {
        Vec dlo, dhi, xlo, xhi;
        Ch::load(g_row + i, dlo, dhi);
        Ch::load(x_row + i, xlo, xhi);
        const Vec hlo = (xlo - vmu) * vrs, hhi = (xhi - vmu) * vrs;
        const Vec glo = w ? dlo * Vec::loadu(w + i) : dlo;
        const Vec ghi = w ? dhi * Vec::loadu(w + i + W) : dhi;
        a.s1lo = a.s1lo + glo;
        a.s1hi = a.s1hi + ghi;
        a.s2lo = at::vec::fmadd(glo, hlo, a.s2lo);
        a.s2hi = at::vec::fmadd(ghi, hhi, a.s2hi);
        if (partials) {
          at::vec::fmadd(dlo, hlo, Vec::loadu(dw_part + i)).store(dw_part + i);
          at::vec::fmadd(dhi, hhi, Vec::loadu(dw_part + i + W)).store(dw_part + i + W);
          (Vec::loadu(db_part + i) + dlo).store(db_part + i);
          (Vec::loadu(db_part + i + W) + dhi).store(db_part + i + W);
        }
      });
      acc s1 = hsum((a0.s1lo + a0.s1hi) + (a1.s1lo + a1.s1hi));
      acc s2 = hsum((a0.s2lo + a0.s2hi) + (a1.s2lo + a1.s2hi));
      for (int64_t i = t; i < N; ++i) {
        const acc d = static_cast<acc>(g_row[i]);
        const acc xh = (static_cast<acc>(x_row[i]) - mu) * rs;
        const acc g = w ? d * w[i] : d;
        s1 += g;
        s2 += g * xh;
        if (partials) {
          dw_part[i] += d * xh;
          db_part[i] += d;
        }
      }
      // Pass 2, in L1: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual, in acc
      // before the single rounding), written as dx = a*g + k*xhat + c so the inner loop is two
      // fused multiply-adds after xhat.
      const acc ka = rs, kk = -rs * s2 / N, kc = -rs * s1 / N;
      const Vec va(ka), vk(kk), vc(kc);
      const scalar_t* dr = drp ? drp + row * N : nullptr;
      scalar_t* dxr = dxp + row * N;
      int64_t i = 0;
      for (; i + C <= N; i += C) {
        Vec dlo, dhi, xlo, xhi;
        Ch::load(g_row + i, dlo, dhi);
        Ch::load(x_row + i, xlo, xhi);
        const Vec glo = w ? dlo * Vec::loadu(w + i) : dlo;
        const Vec ghi = w ? dhi * Vec::loadu(w + i + W) : dhi;
        const Vec hlo = (xlo - vmu) * vrs, hhi = (xhi - vmu) * vrs;
        Vec lo = at::vec::fmadd(va, glo, at::vec::fmadd(vk, hlo, vc));
        Vec hi = at::vec::fmadd(va, ghi, at::vec::fmadd(vk, hhi, vc));
        if (dr) {
          Vec rlo, rhi;
          Ch::load(dr + i, rlo, rhi);
          lo = lo + rlo;
          hi = hi + rhi;
        }
        if (nt) {
          Ch::stream(dxr + i, lo, hi);
        } else {
          Ch::store(dxr + i, lo, hi);
        }
      }
      for (; i < N; ++i) {
        const acc g = w ? static_cast<acc>(g_row[i]) * w[i] : static_cast<acc>(g_row[i]);
        acc v = ka * g + kk * ((static_cast<acc>(x_row[i]) - mu) * rs) + kc;
        if (dr) v += static_cast<acc>(dr[i]);
        dxr[i] = static_cast<scalar_t>(v);
      }
    }
    if (nt) stream_fence();
  });

  if (!partials) return;
  // Sum the per-thread partials column-wise, in a fixed thread order.
  at::Tensor total = at::zeros({2 * N}, acc_opts);
  acc* tp = total.data_ptr<acc>();
  const acc* pp = part.const_data_ptr<acc>();
  for (int t = 0; t < nthreads; ++t) {
    int64_t i = 0;
    for (; i + W <= 2 * N; i += W)
      (Vec::loadu(tp + i) + Vec::loadu(pp + t * 2 * N + i)).store(tp + i);
    for (; i < 2 * N; ++i) tp[i] += pp[t * 2 * N + i];
  }
  auto write = [&](at::Tensor& outp, const acc* src) {
    if constexpr (reduced) {
      narrow_row(src, outp.data_ptr<scalar_t>(), N);
    } else {
      std::copy(src, src + N, outp.data_ptr<scalar_t>());
    }
  };
  if (weight_grad) write(dweight, tp);
  if (bias_grad) write(dbias, tp + N);
}

// ---- entry points: argument checks, allocation, dtype dispatch -------------------------------

void check_param(const c10::optional<at::Tensor>& p, const at::Tensor& x, const char* op,
                 const char* name) {
  if (!p.has_value() || !p->defined()) return;
  check_cpu_float(*p, op, name);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), op, ": ", name, " must have shape (",
              x.size(1), "), got ", p->sizes());
  TORCH_CHECK(p->scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
              p->scalar_type(), " but input has dtype ", x.scalar_type());
}

void check_input(const at::Tensor& x, const char* op) {
  check_cpu_float(x, op, "input");
  TORCH_CHECK(x.dim() == 2, op, ": input must be 2-D (rows, hidden), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) > 0, op, ": the normalized dimension is empty (shape ", x.sizes(), ")");
}

at::Tensor opt(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

#define FASTGPT_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "fastgpt::layer_norm_fwd";
  check_input(x, op);
  check_param(weight, x, op, "weight");
  check_param(bias, x, op, "bias");
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  at::Tensor y = empty_output_like(x);
  at::Tensor mean = at::empty({x.size(0)}, x.options().dtype(stat_dtype(x)));
  at::Tensor rstd = at::empty_like(mean);
  at::Tensor none;
  if (x.numel() == 0) return {y, mean, rstd};
  FASTGPT_DISPATCH_FLOATS(x.scalar_type(), op, [&] {
    layer_norm_fwd_kernel<scalar_t>(x, none, opt(weight), opt(bias), eps, y, none, mean, rstd);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "fastgpt::add_layer_norm_fwd";
  check_input(x, op);
  check_cpu_float(residual, op, "residual");
  check_same(x, residual, op, "input", "residual");
  check_param(weight, x, op, "weight");
  check_param(bias, x, op, "bias");
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  at::Tensor y = empty_output_like(x);
  at::Tensor summed = empty_output_like(x);
  at::Tensor mean = at::empty({x.size(0)}, x.options().dtype(stat_dtype(x)));
  at::Tensor rstd = at::empty_like(mean);
  if (x.numel() == 0) return {y, summed, mean, rstd};
  FASTGPT_DISPATCH_FLOATS(x.scalar_type(), op, [&] {
    layer_norm_fwd_kernel<scalar_t>(x, residual, opt(weight), opt(bias), eps, y, summed, mean,
                                    rstd);
  });
  return {y, summed, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& dresidual,
    bool weight_grad, bool bias_grad) {
  constexpr const char* op = "fastgpt::layer_norm_bwd";
  check_input(x, op);
  check_cpu_float(dy, op, "grad_output");
  check_same(x, dy, op, "input", "grad_output");
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->device().is_cpu() && s->is_contiguous(), op,
                ": mean and rstd must be contiguous CPU tensors");
    TORCH_CHECK(s->scalar_type() == stat_dtype(x), op, ": mean and rstd must be ",
                stat_dtype(x), " for ", x.scalar_type(), " input, got ", s->scalar_type());
    TORCH_CHECK(s->dim() == 1 && s->size(0) == x.size(0), op,
                ": mean and rstd must have shape (", x.size(0), "), got ", s->sizes());
  }
  check_param(weight, x, op, "weight");
  if (dresidual.has_value() && dresidual->defined()) {
    check_cpu_float(*dresidual, op, "grad_residual");
    check_same(x, *dresidual, op, "input", "grad_residual");
  }
  at::Tensor dx = empty_output_like(x);
  at::Tensor dweight = at::empty({weight_grad ? x.size(1) : 0}, x.options());
  at::Tensor dbias = at::empty({bias_grad ? x.size(1) : 0}, x.options());
  if (x.size(0) == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  FASTGPT_DISPATCH_FLOATS(x.scalar_type(), op, [&] {
    layer_norm_bwd_kernel<scalar_t>(dy, x, mean, rstd, opt(weight), opt(dresidual), weight_grad,
                                    bias_grad, dx, dweight, dbias);
  });
  return {dx, dweight, dbias};
}

void register_layer_norm(torch::Library& m) {
  m.impl("layer_norm_fwd", TORCH_FN(layer_norm_fwd));
  m.impl("add_layer_norm_fwd", TORCH_FN(add_layer_norm_fwd));
  m.impl("layer_norm_bwd", TORCH_FN(layer_norm_bwd));
}

const OpRegistrar registrar(&register_layer_norm);

}  // namespace

}  // namespace fastgpt
