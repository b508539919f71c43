// LayerNorm over the last dim of a contiguous (M, N) tensor, with an optional fused residual add.
//
// Forward: one task per block of rows; each row is read once into registers/L1, then three short
// passes over it (mean, centred variance, normalise) while it is still in L1. Statistics are
// accumulated in fp32 (double for float64 inputs) and saved for the backward.
// Backward: one pass over the rows computes dx and, in the same pass, per-thread partials of
// dweight and dbias, which are summed across threads at the end (no atomics, deterministic for a
// fixed thread count).
#include "common.h"
#include "huge_pages.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <cmath>

namespace fastgpt {
namespace {

using at::vec::Vectorized;

// y = (x - mean) * rstd * w + b over one row. Subtracting the mean first (rather than folding
// it into x * rstd - mean * rstd) keeps full precision when |mean| >> std.
template <typename acc>
inline void normalize_row(const acc* x, const acc* w, const acc* b, acc* y, int64_t n, acc mean,
                          acc rstd) {
  using Vec = Vectorized<acc>;
  const Vec vmean(mean), vrstd(rstd);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec v = (Vec::loadu(x + i) - vmean) * vrstd;
    if (w) v = v * Vec::loadu(w + i);
    if (b) v = v + Vec::loadu(b + i);
    v.store(y + i);
  }
  for (; i < n; ++i) {
    acc v = (x[i] - mean) * rstd;
    if (w) v *= w[i];
    if (b) v += b[i];
    y[i] = v;
  }
}

// Mean and centred (biased) variance of one row, two passes over data already in L1.
template <typename acc>
inline std::pair<acc, acc> row_moments(const acc* x, int64_t n) {
  using Vec = Vectorized<acc>;
  Vec vsum(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) vsum = vsum + Vec::loadu(x + i);
  acc sum = hsum(vsum);
  for (; i < n; ++i) sum += x[i];
  const acc mean = sum / n;
  const Vec vmean(mean);
  Vec vsq(0);
  i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec d = Vec::loadu(x + i) - vmean;
    vsq = at::vec::fmadd(d, d, vsq);
  }
  acc sq = hsum(vsq);
  for (; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
  return {mean, sq / n};
}

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

template <typename scalar_t>
void layer_norm_fwd_kernel(const at::Tensor& x, const at::Tensor& residual,
                           const at::Tensor& weight, const at::Tensor& bias, double eps,
                           at::Tensor& y, at::Tensor& summed, at::Tensor& mean,
                           at::Tensor& rstd) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
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

  // Per-thread scratch, allocated once: two fp32 rows for bf16/fp16 (input and residual).
  const int64_t scratch_rows = is_reduced_v<scalar_t> ? 2 : 0;
  at::Tensor scratch = at::empty({at::get_num_threads(), scratch_rows * N},
                                 x.options().dtype(c10::CppTypeToScalarType<acc>::value));

  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    acc* buf = scratch.data_ptr<acc>() + at::get_thread_num() * scratch_rows * N;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* xr = xp + row * N;
      const acc* in;  // the row LayerNorm sees, in acc precision
      if constexpr (is_reduced_v<scalar_t>) {
        widen_row(xr, buf, N);
        if (rp) {
          // Round x + r once to the storage dtype, as eager `x + r` does, and normalise the
          // rounded values so the result matches layer_norm(x + r) exactly.
          widen_row(rp + row * N, buf + N, N);
          int64_t i = 0;
          for (; i + Vec::size() <= N; i += Vec::size())
            (Vec::loadu(buf + i) + Vec::loadu(buf + N + i)).store(buf + i);
          for (; i < N; ++i) buf[i] += buf[N + i];
          narrow_row(buf, sp + row * N, N);
          widen_row(sp + row * N, buf, N);
        }
        in = buf;
      } else {
        if (rp) {
          const scalar_t* rr = rp + row * N;
          scalar_t* sr = sp + row * N;
          int64_t i = 0;
          for (; i + Vec::size() <= N; i += Vec::size())
            (Vec::loadu(xr + i) + Vec::loadu(rr + i)).store(sr + i);
          for (; i < N; ++i) sr[i] = xr[i] + rr[i];
          in = sr;
        } else {
          in = xr;
        }
      }
      auto [mu, var] = row_moments(in, N);
      const acc rs = acc(1) / std::sqrt(var + static_cast<acc>(eps));
      meanp[row] = mu;
      rstdp[row] = rs;
      if constexpr (is_reduced_v<scalar_t>) {
        normalize_row<acc>(in, w, b, buf, N, mu, rs);
        narrow_row(buf, yp + row * N, N);
      } else {
        normalize_row<acc>(in, w, b, yp + row * N, N, mu, rs);
      }
    }
  });
}

template <typename scalar_t>
void layer_norm_bwd_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& rstd, const at::Tensor& weight,
                           const at::Tensor& dresidual, bool weight_grad, bool bias_grad,
                           at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
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

  // Per-thread partial sums of dweight and dbias (zeroed once), and for bf16/fp16 three fp32
  // scratch rows (dy, x, and dx before rounding).
  const bool partials = weight_grad || bias_grad;
  at::Tensor part = partials ? at::zeros({nthreads, 2 * N}, acc_opts) : at::Tensor();
  const int64_t scratch_rows = reduced ? 3 : 0;
  at::Tensor scratch = at::empty({nthreads, scratch_rows * N}, acc_opts);

  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    acc* dw_part = partials ? part.data_ptr<acc>() + tid * 2 * N : nullptr;
    acc* db_part = partials ? dw_part + N : nullptr;
    acc* buf = scratch.data_ptr<acc>() + tid * scratch_rows * N;
    for (int64_t row = begin; row < end; ++row) {
      const acc *g_row, *x_row;
      if constexpr (reduced) {
        widen_row(dyp + row * N, buf, N);
        widen_row(xp + row * N, buf + N, N);
        g_row = buf;
        x_row = buf + N;
      } else {
        g_row = dyp + row * N;
        x_row = xp + row * N;
      }
      const acc mu = meanp[row], rs = rstdp[row];
      const Vec vmu(mu), vrs(rs);
      // Pass 1: sum(dy*w), sum(dy*w*xhat), and the weight/bias partials.
      Vec vs1(0), vs2(0);
      int64_t i = 0;
      for (; i + Vec::size() <= N; i += Vec::size()) {
        const Vec d = Vec::loadu(g_row + i);
        const Vec xh = (Vec::loadu(x_row + i) - vmu) * vrs;
        const Vec g = w ? d * Vec::loadu(w + i) : d;
        vs1 = vs1 + g;
        vs2 = at::vec::fmadd(g, xh, vs2);
        if (partials) {
          at::vec::fmadd(d, xh, Vec::loadu(dw_part + i)).store(dw_part + i);
          (Vec::loadu(db_part + i) + d).store(db_part + i);
        }
      }
      acc s1 = hsum(vs1), s2 = hsum(vs2);
      for (; i < N; ++i) {
        const acc d = g_row[i], xh = (x_row[i] - mu) * rs;
        const acc g = w ? d * w[i] : d;
        s1 += g;
        s2 += g * xh;
        if (partials) {
          dw_part[i] += d * xh;
          db_part[i] += d;
        }
      }
      // Pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual), written as
      // dx = a*g + k*xhat + c so the inner loop is two fused multiply-adds after xhat.
      const acc a = rs, k = -rs * s2 / N, c = -rs * s1 / N;
      const Vec va(a), vk(k), vc(c);
      acc* out = reduced ? buf + 2 * N : nullptr;
      const scalar_t* dr = drp ? drp + row * N : nullptr;
      scalar_t* dxr = dxp + row * N;
      i = 0;
      for (; i + Vec::size() <= N; i += Vec::size()) {
        const Vec d = Vec::loadu(g_row + i);
        const Vec g = w ? d * Vec::loadu(w + i) : d;
        const Vec xh = (Vec::loadu(x_row + i) - vmu) * vrs;
        Vec v = at::vec::fmadd(va, g, at::vec::fmadd(vk, xh, vc));
        if constexpr (reduced) {
          v.store(out + i);
        } else {
          if (dr) v = v + Vec::loadu(dr + i);
          v.store(dxr + i);
        }
      }
      for (; i < N; ++i) {
        const acc g = w ? g_row[i] * w[i] : g_row[i];
        acc v = a * g + k * ((x_row[i] - mu) * rs) + c;
        if constexpr (reduced) {
          out[i] = v;
        } else {
          if (dr) v += dr[i];
          dxr[i] = v;
        }
      }
      if constexpr (reduced) {
        if (dr) {
          // Add the residual's gradient in fp32 before the single rounding.
          widen_row(dr, buf, N);
          int64_t j = 0;
          for (; j + Vec::size() <= N; j += Vec::size())
            (Vec::loadu(out + j) + Vec::loadu(buf + j)).store(out + j);
          for (; j < N; ++j) out[j] += buf[j];
        }
        narrow_row(out, dxr, N);
      }
    }
  });

  if (!partials) return;
  // Sum the per-thread partials column-wise, in a fixed thread order.
  at::Tensor total = at::zeros({2 * N}, acc_opts);
  acc* tp = total.data_ptr<acc>();
  const acc* pp = part.const_data_ptr<acc>();
  for (int t = 0; t < nthreads; ++t) {
    int64_t i = 0;
    for (; i + Vec::size() <= 2 * N; i += Vec::size())
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
