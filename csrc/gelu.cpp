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
//
// Derivatives (s(1 - s) = T(1 - T) for the sigmoid, as sigmoid is symmetric):
//   tanh:  dy/dx = P + 2 x T (1 - T) sqrt(2/pi) (1 + 3 * 0.044715 x^2)   (x clamped to +-20)
//   erf:   dy/dx = P + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
#include "common.h"

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
    return Vec::blendv(Vec(acc(1)) - t, t, x < Vec(acc(0)));
  }

  template <Approx A>
  static Vec forward(const Vec& x) {
    return x * cdf(x, tail<A>(x));
  }

  template <Approx A>
  static Vec derivative(const Vec& x) {
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

// ---- loading and storing chunks of 2 acc vectors (one bf16/fp16 vector) ---------------------

template <typename scalar_t>
struct Chunk {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  static constexpr int64_t W = Vec::size();
  static constexpr int64_t kSize = 2 * W;

  // n <= kSize elements; lanes past n read as 0.
  static void load(const scalar_t* p, int64_t n, Vec& lo, Vec& hi) {
    if constexpr (is_reduced_v<scalar_t>) {
      auto v = n == kSize ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n);
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(v);
    } else if (n == kSize) {
      lo = Vec::loadu(p);
      hi = Vec::loadu(p + W);
    } else {
      lo = Vec::loadu(p, std::min(n, W));
      hi = n > W ? Vec::loadu(p + W, n - W) : Vec(acc(0));
    }
  }

  static void store(scalar_t* p, int64_t n, const Vec& lo, const Vec& hi) {
    if constexpr (is_reduced_v<scalar_t>) {
      auto v = at::vec::convert_from_float<scalar_t>(lo, hi);
      n == kSize ? v.store(p) : v.store(p, n);
    } else if (n == kSize) {
      lo.store(p);
      hi.store(p + W);
    } else {
      lo.store(p, std::min(n, W));
      if (n > W) hi.store(p + W, n - W);
    }
  }

  // The same for an acc row (the bias partials), always acc-typed.
  static void load_acc(const acc* p, int64_t n, Vec& lo, Vec& hi) {
    lo = Vec::loadu(p, std::min(n, W));
    hi = n > W ? Vec::loadu(p + W, n - W) : Vec(acc(0));
  }
  static void store_acc(acc* p, int64_t n, const Vec& lo, const Vec& hi) {
    lo.store(p, std::min(n, W));
    if (n > W) hi.store(p + W, n - W);
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
      // Two chunks per iteration: independent dependency chains the core can overlap.
#pragma GCC unroll 2
      for (int64_t j = 0; j < len; j += C_::kSize) {
        const int64_t n = std::min(C_::kSize, len - j);
        Vec lo, hi;
        C_::load(xp + off + j, n, lo, hi);
        if (bp) {
          Vec blo, bhi;
          C_::load(bp + col + j, n, blo, bhi);
          lo = lo + blo;
          hi = hi + bhi;
        }
        C_::store(yp + off + j, n, M::template forward<A>(lo), M::template forward<A>(hi));
      }
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
      // Two chunks per iteration: independent dependency chains the core can overlap.
#pragma GCC unroll 2
      for (int64_t j = 0; j < len; j += C_::kSize) {
        const int64_t n = std::min(C_::kSize, len - j);
        Vec lo, hi, glo, ghi;
        C_::load(xp + off + j, n, lo, hi);
        C_::load(dyp + off + j, n, glo, ghi);
        if (bp) {
          Vec blo, bhi;
          C_::load(bp + col + j, n, blo, bhi);
          lo = lo + blo;
          hi = hi + bhi;
        }
        // Lanes past n hold x = 0 and dy = 0: their dx is 0, so the partials stay exact.
        const Vec dlo = glo * M::template derivative<A>(lo);
        const Vec dhi = ghi * M::template derivative<A>(hi);
        C_::store(dxp + off + j, n, dlo, dhi);
        if (dpart) {
          Vec plo, phi;
          C_::load_acc(dpart + col + j, n, plo, phi);
          C_::store_acc(dpart + col + j, n, plo + dlo, phi + dhi);
        }
      }
    });
  });

  if (!bias_grad) return;
  // Sum the per-thread partials column-wise in a fixed thread order; the first row is the total.
  acc* total = part.data_ptr<acc>();
  for (int t = 1; t < nthreads; ++t) {
    const acc* row = total + t * C;
    for (int64_t j = 0; j < C; j += C_::kSize) {
      const int64_t n = std::min(C_::kSize, C - j);
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
  at::Tensor y = at::empty_like(x);
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
  at::Tensor dx = at::empty_like(x);
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
