// GELU and bias+GELU over a contiguous tensor, forward and backward.
//
//   gelu_fwd(x, bias?, approximate)                     -> y = gelu(x + bias)
//   gelu_bwd(dy, x, bias?, approximate, bias_grad)      -> (dx, dbias)
//
// The bias (C,) is broadcast over the last dim of x (..., C); x + bias is kept in fp32 (never
// rounded) and the result is rounded once. The backward recomputes everything from x (+ bias):
// nothing but the inputs is saved. dbias = sum over rows of dx is accumulated in the same pass into
// per-thread column partials, summed in a fixed thread order at the end (no atomics).
//
// Numerics. Both GELUs are written as y = x * P(x), with P a CDF-like function in [0, 1], and P is
// computed from its small "tail" T = min(P, 1 - P) in [0, 0.5]:
//   P(x) = T        for x < 0,      P(x) = 1 - T      for x >= 0.
//   tanh:  T = sigmoid(-2|u|) = z / (1 + z),  z = exp(-2|u|),  u = sqrt(2/pi) (x + 0.044715 x^3)
//          (0.5 (1 + tanh(u)) = sigmoid(2u), so this is the same function as GPT-2's).
//   erf:   T = 0.5 erfc(|x| / sqrt(2))
// Evaluating the tail avoids the cancellation in 1 + tanh(u) / 1 + erf(.) for negative x (so the
// small negative outputs keep their relative accuracy) and every exp argument is <= 0 (no
// overflow). exp is at::vec's exp_u20 (a degree-5 polynomial, relative error ~3e-7): T only needs
// a few 1e-7 relative error, because y = x * T or x * (1 - T). This replaces SLEEF's tanhf/erff
// u10 (what torch uses), which cost several times more per element.
// erfc(a) = t exp(-a^2 + R(t)), t = 1 / (1 + a/2), with R the degree-9 Chebyshev fit of
// Numerical Recipes' erfcc (fractional error < 1.2e-7 for every a >= 0).
// float64 (gradcheck) uses the exact exp/erfc of at::vec instead.
// AVX-512 fp32 (the build that matters for speed) computes neither exp nor erfc nor a
// reciprocal: each form's tail T(|x|), and the derivative's tail U(|x|) (dy/dx = U below zero,
// 1 - U above), is a piecewise polynomial of |x| on 32 intervals (csrc/gelu_tables.h, fitted by
// scripts/gen_gelu_tables.py, which prints their errors), each lane's coefficients picked with
// one vpermt2ps per coefficient: ~23 vector operations per 16 elements where the formulas above
// take ~45. torch's exact GELU forward is oneDNN's JIT kernel, which this has to beat.
//
// Derivatives (s(1 - s) = T(1 - T) for the sigmoid, as sigmoid is symmetric):
//   tanh:  dy/dx = P + 2 x T (1 - T) sqrt(2/pi) (1 + 3 * 0.044715 x^2)   (x clamped to +-20)
//   erf:   dy/dx = P + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
#include "chunk.h"
#include "common.h"
#include "gelu_tables.h"
#include "output_memory.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <string_view>

namespace fastgpt {
namespace {

using at::vec::Vectorized;

enum class Approx { kNone, kTanh };

template <typename acc>
struct GeluMath {
  using Vec = Vectorized<acc>;
  static constexpr acc kBeta = acc(0.7978845608028654);   // sqrt(2 / pi)
  static constexpr acc kKappa = acc(0.044715);
  static constexpr acc kInvSqrt2 = acc(0.7071067811865476);
  static constexpr acc kInvSqrt2Pi = acc(0.3989422804014327);

  static Vec exp_neg(const Vec& v) {  // exp(v) for v <= 0
    if constexpr (std::is_same_v<acc, float>) {
      return v.exp_u20();
    } else {
      return v.exp();
    }
  }

#if defined(CPU_CAPABILITY_AVX512)
  // A tail (T or U, see the file comment) at |x| from its table: interval i = round(|x| / H)
  // (the last one, all zeros, also takes |x| beyond the table, and nan), t = |x| / H - i in
  // [-1/2, 1/2], then Horner in t with each coefficient picked per lane from the 32 of its row
  // (two registers) by vpermt2ps.
  template <int kCoefs>
  static __m512 table_tail(const __m512 x, const float (&table)[kCoefs][kGeluTableIntervals]) {
    static_assert(kGeluTableIntervals == 32, "one vpermt2ps selects from 2 x 16 floats");
    const __m512 w =
        _mm512_min_ps(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(kGeluTableInvWidth)),
                      _mm512_set1_ps(float(kGeluTableIntervals - 1)));
    const __m512 r = _mm512_roundscale_ps(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 t = _mm512_sub_ps(w, r);
    const __m512i i = _mm512_cvtps_epi32(r);
    auto coef = [&](int k) {
      return _mm512_permutex2var_ps(_mm512_load_ps(table[k]), i, _mm512_load_ps(table[k] + 16));
    };
    __m512 p = coef(kCoefs - 1);
    for (int k = kCoefs - 2; k >= 0; --k) p = _mm512_fmadd_ps(p, t, coef(k));
    return p;
  }
#endif

  static Vec erfc_pos(const Vec& a) {  // erfc(a) for a >= 0
    if constexpr (std::is_same_v<acc, float>) {
      const Vec t = Vec(1.f) / at::vec::fmadd(a, Vec(0.5f), Vec(1.f));
      // R(t) = sum c_k t^k, k = 0..9, by Estrin's scheme: a dependency chain of 5 operations
      // instead of Horner's 9, so that the out-of-order core overlaps more elements.
      auto pair = [&](float c0, float c1) { return at::vec::fmadd(t, Vec(c1), Vec(c0)); };
      const Vec t2 = t * t, t4 = t2 * t2, t8 = t4 * t4;
      const Vec r01 =
          at::vec::fmadd(t2, pair(0.37409196f, 0.09678418f), pair(-1.26551223f, 1.00002368f));
      const Vec r45 =
          at::vec::fmadd(t2, pair(-1.13520398f, 1.48851587f), pair(-0.18628806f, 0.27886807f));
      const Vec r0 = at::vec::fmadd(t4, r45, r01);
      const Vec r = at::vec::fmadd(t8, pair(-0.82215223f, 0.17087277f), r0);
      return t * exp_neg(r - a * a);
    } else {
      return a.erfc();
    }
  }

  // The tail T(x) in [0, 0.5] (see the file comment).
  template <Approx A>
  static Vec tail(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc, float>) {
      return Vec(A == Approx::kTanh ? table_tail(x, kGeluTanhTail) : table_tail(x, kGeluErfTail));
    }
#endif
    if constexpr (A == Approx::kTanh) {
      // |u| = |x| (beta + beta kappa x^2)
      const Vec au = x.abs() * at::vec::fmadd(x * x, Vec(kBeta * kKappa), Vec(kBeta));
      const Vec z = exp_neg(au * Vec(acc(-2)));
      return z / (z + Vec(acc(1)));
    } else {
      return erfc_pos(x.abs() * Vec(kInvSqrt2)) * Vec(acc(0.5));
    }
  }

  // P(x) from its tail: T below zero, 1 - T at or above.
  static Vec cdf(const Vec& x, const Vec& t) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc, float>) {  // one compare into a k-mask and one blend
      const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
      return Vec(_mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(1.f), t), t));
    }
#endif
    return Vec::blendv(Vec(acc(1)) - t, t, x < Vec(acc(0)));
  }

  template <Approx A>
  static Vec forward(const Vec& x) {
    return x * cdf(x, tail<A>(x));
  }

  template <Approx A>
  static Vec derivative(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc, float>) {
      // U below zero, 1 - U above. The last interval's 0 would give a nan x the finite
      // derivative 1: a nan x is passed through instead (+-inf keep the limits 1 and 0).
      const __m512 u = A == Approx::kTanh ? table_tail(x, kGeluTanhDerivTail)
                                          : table_tail(x, kGeluErfDerivTail);
      const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      return Vec(_mm512_mask_mov_ps(cdf(x, Vec(u)), is_nan, x));
    }
#endif
    const Vec t = tail<A>(x);
    const Vec p = cdf(x, t);
    if constexpr (A == Approx::kTanh) {
      // Beyond |x| = 20 the tail t is exactly 0 (exp underflows), and so is this term; clamping
      // x there keeps x^2 from overflowing into 0 * inf = nan (NaN itself still propagates).
      const Vec xc = at::vec::minimum(at::vec::maximum(x, Vec(acc(-20))), Vec(acc(20)));
      const Vec du = at::vec::fmadd(xc * xc, Vec(3 * kBeta * kKappa), Vec(kBeta));  // du/dx
      return at::vec::fmadd(xc * Vec(acc(2)) * t * (Vec(acc(1)) - t), du, p);
    } else {
      const Vec phi = exp_neg(x * x * Vec(acc(-0.5))) * Vec(kInvSqrt2Pi);
      return at::vec::fmadd(x, phi, p);
    }
  }
};

// Calls seg(offset, col, len) for each piece of the flat range [begin, end) that stays inside one
// row of C columns (C = the range's length when there is no bias: one piece).
template <typename F>
inline void for_each_row_piece(int64_t begin, int64_t end, int64_t C, const F& seg) {
  int64_t i = begin;
  while (i < end) {
    const int64_t col = i % C;
    const int64_t len = std::min(C - col, end - i);
    seg(i, col, len);
    i += len;
  }
}

template <typename scalar_t, Approx A>
void gelu_fwd_kernel(const at::Tensor& x, const at::Tensor& bias, at::Tensor& y) {
  using C_ = Chunk<scalar_t>;
  using Vec = typename C_::Vec;
  using M = GeluMath<typename C_::acc>;
  const int64_t numel = x.numel();
  const bool has_bias = bias.defined();
  const int64_t C = has_bias ? bias.numel() : numel;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* bp = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();

  at::parallel_for(0, numel, kGrainSize, [&](int64_t begin, int64_t end) {
    for_each_row_piece(begin, end, C, [&](int64_t off, int64_t col, int64_t len) {
      // Full chunks with no length branches (two per iteration: independent dependency chains
      // the core can overlap), then the tail once, masked.
      const int64_t full = len - len % C_::size;
      auto step = [&](int64_t j, int64_t n, auto is_full) {
        Vec lo, hi;
        if constexpr (decltype(is_full)::value) {
          C_::load(xp + off + j, lo, hi);
        } else {
          C_::load(xp + off + j, n, lo, hi);
        }
        if (bp) {
          Vec blo, bhi;
          if constexpr (decltype(is_full)::value) {
            C_::load(bp + col + j, blo, bhi);
          } else {
            C_::load(bp + col + j, n, blo, bhi);
          }
          lo = lo + blo;
          hi = hi + bhi;
        }
        const Vec ylo = M::template forward<A>(lo), yhi = M::template forward<A>(hi);
        if constexpr (decltype(is_full)::value) {
          C_::store(yp + off + j, ylo, yhi);
        } else {
          C_::store(yp + off + j, n, ylo, yhi);
        }
      };
#pragma GCC unroll 2
      for (int64_t j = 0; j < full; j += C_::size) step(j, C_::size, std::true_type{});
      if (full < len) step(full, len - full, std::false_type{});
    });
  });
}

template <typename scalar_t, Approx A>
void gelu_bwd_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bias,
                     bool bias_grad, at::Tensor& dx, at::Tensor& dbias) {
  using C_ = Chunk<scalar_t>;
  using acc = typename C_::acc;
  using Vec = typename C_::Vec;
  using M = GeluMath<acc>;
  const int64_t numel = x.numel();
  const bool has_bias = bias.defined();
  const int64_t C = has_bias ? bias.numel() : numel;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* bp = has_bias ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* dxp = dx.data_ptr<scalar_t>();

  // One row of acc partials of dbias per thread, zeroed once.
  const int nthreads = at::get_num_threads();
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc>::value);
  at::Tensor part = bias_grad ? at::zeros({nthreads, C}, acc_opts) : at::Tensor();

  at::parallel_for(0, numel, kGrainSize, [&](int64_t begin, int64_t end) {
    acc* dpart = bias_grad ? part.data_ptr<acc>() + at::get_thread_num() * C : nullptr;
    for_each_row_piece(begin, end, C, [&](int64_t off, int64_t col, int64_t len) {
      // Full chunks with no length branches (two per iteration), then the tail once, masked.
      const int64_t full = len - len % C_::size;
      auto step = [&](int64_t j, int64_t n, auto is_full) {
        constexpr bool kFull = decltype(is_full)::value;
        Vec lo, hi, glo, ghi;
        if constexpr (kFull) {
          C_::load(xp + off + j, lo, hi);
          C_::load(dyp + off + j, glo, ghi);
        } else {
          C_::load(xp + off + j, n, lo, hi);
          C_::load(dyp + off + j, n, glo, ghi);
        }
        if (bp) {
          Vec blo, bhi;
          if constexpr (kFull) {
            C_::load(bp + col + j, blo, bhi);
          } else {
            C_::load(bp + col + j, n, blo, bhi);
          }
          lo = lo + blo;
          hi = hi + bhi;
        }
        // Lanes past n hold x = 0 and dy = 0: their dx is 0, so the partials stay exact.
        const Vec dlo = glo * M::template derivative<A>(lo);
        const Vec dhi = ghi * M::template derivative<A>(hi);
        if constexpr (kFull) {
          C_::store(dxp + off + j, dlo, dhi);
        } else {
          C_::store(dxp + off + j, n, dlo, dhi);
        }
        if (dpart) {
          Vec plo, phi;
          C_::load_acc(dpart + col + j, n, plo, phi);
          C_::store_acc(dpart + col + j, n, plo + dlo, phi + dhi);
        }
      };
#pragma GCC unroll 2
      for (int64_t j = 0; j < full; j += C_::size) step(j, C_::size, std::true_type{});
      if (full < len) step(full, len - full, std::false_type{});
    });
  });

  if (!bias_grad) return;
  // Sum the per-thread partials column-wise in a fixed thread order; the first row is the total.
  acc* total = part.data_ptr<acc>();
  for (int t = 1; t < nthreads; ++t) {
    const acc* row = total + t * C;
    for (int64_t j = 0; j < C; j += C_::size) {
      const int64_t n = std::min(C_::size, C - j);
      Vec a0, a1, b0, b1;
      C_::load_acc(total + j, n, a0, a1);
      C_::load_acc(row + j, n, b0, b1);
      C_::store_acc(total + j, n, a0 + b0, a1 + b1);
    }
  }
  if constexpr (is_reduced_v<scalar_t>) {
    narrow_row(total, dbias.data_ptr<scalar_t>(), C);
  } else {
    std::copy(total, total + C, dbias.data_ptr<scalar_t>());
  }
}

// ---- entry points: argument checks, allocation, dtype dispatch -------------------------------

Approx parse_approximate(std::string_view approximate, const char* op) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", op,
              ": approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh" ? Approx::kTanh : Approx::kNone;
}

at::Tensor check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x,
                      const char* op) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_cpu_float(*bias, op, "bias");
  TORCH_CHECK(x.dim() >= 1, op, ": input must have at least 1 dim to add a bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(-1), op,
              ": bias must have shape (", x.size(-1), ") (the input's last dim), got ",
              bias->sizes());
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias has dtype ",
              bias->scalar_type(), " but input has dtype ", x.scalar_type());
  return *bias;
}

#define FASTGPT_DISPATCH_GELU(DTYPE, APPROX, NAME, ...)                               \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, DTYPE, NAME, [&] {        \
    if (APPROX == Approx::kTanh) {                                                    \
      constexpr Approx A = Approx::kTanh;                                             \
      __VA_ARGS__();                                                                  \
    } else {                                                                          \
      constexpr Approx A = Approx::kNone;                                             \
      __VA_ARGS__();                                                                  \
    }                                                                                 \
  })

at::Tensor gelu_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                    c10::string_view approximate) {
  constexpr const char* op = "fastgpt::gelu_fwd";
  check_cpu_float(x, op, "input");
  const Approx approx = parse_approximate(approximate, op);
  const at::Tensor b = check_bias(bias, x, op);
  at::Tensor y = empty_output_like(x);
  if (x.numel() == 0) return y;
  FASTGPT_DISPATCH_GELU(x.scalar_type(), approx, op, [&] {
    gelu_fwd_kernel<scalar_t, A>(x, b, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> gelu_bwd(const at::Tensor& dy, const at::Tensor& x,
                                            const c10::optional<at::Tensor>& bias,
                                            c10::string_view approximate, bool bias_grad) {
  constexpr const char* op = "fastgpt::gelu_bwd";
  check_cpu_float(x, op, "input");
  check_cpu_float(dy, op, "grad_output");
  check_same(x, dy, op, "input", "grad_output");
  const Approx approx = parse_approximate(approximate, op);
  const at::Tensor b = check_bias(bias, x, op);
  TORCH_CHECK(!bias_grad || b.defined(), op, ": bias_grad needs a bias");
  at::Tensor dx = empty_output_like(x);
  at::Tensor dbias = at::empty({bias_grad ? b.numel() : 0}, x.options());
  if (x.numel() == 0) {
    dbias.zero_();  // a sum over no rows
    return {dx, dbias};
  }
  FASTGPT_DISPATCH_GELU(x.scalar_type(), approx, op, [&] {
    gelu_bwd_kernel<scalar_t, A>(dy, x, b, bias_grad, dx, dbias);
  });
  return {dx, dbias};
}

void register_gelu(torch::Library& m) {
  m.impl("gelu_fwd", TORCH_FN(gelu_fwd));
  m.impl("gelu_bwd", TORCH_FN(gelu_bwd));
}

const OpRegistrar registrar(&register_gelu);

}  // namespace
}  // namespace fastgpt
