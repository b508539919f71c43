// The matrix product of a linear layer: out = a · b [+ bias], through csrc/gemm.h, which sends
// fp32 products to oneDNN where MKL would run slower kernels (see there), except the products of
// 1-4 rows (a decode step), which the loops below compute themselves (see "a few rows").
//
// a (m, k), b (k, n), bias (n,) or none, one floating dtype, CPU. a and b may be any 2-D views:
// a row-major tensor or the transpose of one is read in place (linear's forward reads weightᵀ,
// its backward doutᵀ); other layouts are copied. out is a fresh contiguous (m, n) tensor.
// The autograd side (fastgpt/ops/linear.py, fastgpt/ops/_linear.py) builds F.linear and its
// three gradients from this one op.
#include "common.h"
#include "gemm.h"
#include "output_memory.h"

#include <type_traits>

namespace fastgpt {
namespace {

using at::vec::Vectorized;

// ---- a few rows times a weight: the products of a decode step -----------------------------------
//
// out (m x n) = a (m x k) · wᵀ [+ bias] for m <= kSkinnyRows, w (n x k) row-major: F.linear at
// batch size 1-4 of a decode step. Such a product is a matrix-vector product, bound by reading w
// once; there is nothing to block for. MKL's sgemv ran GPT-2's logits (50257 x 768, 154 MB) at 17
// GB/s on this project's 2-core Zen 5 machine, a third of what the memory gives (a copy of the
// same bytes: 46 GB/s read + write), and its 768-3072 wide layers (in L3) at ~80 GB/s; this loop
// ran 57 GB/s and ~200 GB/s. Every weight row is read once, from memory, for the m input rows:
// a register block of kWeightRows weight rows x m input rows of accumulators, the input rows
// (widened to fp32 once) from L1. Threads take contiguous ranges of weight rows. fp32
// accumulation; bf16/fp16 weights are widened in registers and each output rounded once.
constexpr int kSkinnyRows = 4;

// Weight rows per register block: M x kWeightRows fp32 accumulators and the kWeightRows weight
// vectors fit AVX-512's 32 vector registers, AVX2's 16 at half the rows. More rows are more
// memory streams in flight: a single row's logits ran at 41 GB/s with 4 (bf16) and 54 with 8.
#if defined(CPU_CAPABILITY_AVX512)
template <int M>
constexpr int kWeightRows = M <= 2 ? 8 : 4;
#else
template <int M>
constexpr int kWeightRows = M <= 2 ? 4 : 2;
#endif

// out[r][j0 + w] = x_r · W_{j0 + w} (+ bias) for the M rows x (fp32, ldx apart) and WR weight
// rows from j0.
template <int M, int WR, typename T>
inline void skinny_block(const float* x, int64_t ldx, const T* W, int64_t ldw, int64_t k,
                         int64_t j0, const T* bias, T* out, int64_t ldo) {
  using Vec = Vectorized<float>;
  constexpr int64_t L = Vec::size();
  const int64_t kv = k / L * L;
  const T* w0 = W + j0 * ldw;
  Vec acc[M][WR];
  for (int r = 0; r < M; ++r)
    for (int w = 0; w < WR; ++w) acc[r][w] = Vec(0.f);
  int64_t d = 0;
  if constexpr (!std::is_same_v<T, float>) {
    // Two vectors of fp32 from one full-width load of bf16/fp16 weights.
    for (; d + 2 * L <= kv; d += 2 * L) {
      Vec lo[WR], hi[WR];
      for (int w = 0; w < WR; ++w) at::vec::load_to_float(w0 + w * ldw + d, lo[w], hi[w]);
      for (int r = 0; r < M; ++r) {
        const Vec x0 = Vec::loadu(x + r * ldx + d), x1 = Vec::loadu(x + r * ldx + d + L);
        for (int w = 0; w < WR; ++w)
          acc[r][w] = at::vec::fmadd(x1, hi[w], at::vec::fmadd(x0, lo[w], acc[r][w]));
      }
    }
  }
  for (; d < kv; d += L) {
    Vec wv[WR];
    for (int w = 0; w < WR; ++w) wv[w] = load_as<float>(w0 + w * ldw + d);
    for (int r = 0; r < M; ++r) {
      const Vec xv = Vec::loadu(x + r * ldx + d);
      for (int w = 0; w < WR; ++w) acc[r][w] = at::vec::fmadd(xv, wv[w], acc[r][w]);
    }
  }
  for (int r = 0; r < M; ++r) {
    for (int w = 0; w < WR; ++w) {
      float s = hsum(acc[r][w]);
      for (int64_t d = kv; d < k; ++d) s += x[r * ldx + d] * static_cast<float>(w0[w * ldw + d]);
      if (bias != nullptr) s += static_cast<float>(bias[j0 + w]);
      out[r * ldo + j0 + w] = static_cast<T>(s);
    }
  }
}

template <int M, typename T>
void skinny_rows(const float* x, int64_t ldx, const T* W, int64_t ldw, int64_t n, int64_t k,
                 const T* bias, T* out, int64_t ldo) {
  constexpr int WR = kWeightRows<M>;
  const int64_t blocks = n / WR;
  // Tasks of at least ~kGrainSize weights.
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, WR * k));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      skinny_block<M, WR>(x, ldx, W, ldw, k, b * WR, bias, out, ldo);
  });
  for (int64_t j = blocks * WR; j < n; ++j)
    skinny_block<M, 1>(x, ldx, W, ldw, k, j, bias, out, ldo);
}

// The same product for a weight stored (in, out): b (k x n) row-major, as transformers' Conv1D
// (GPT-2's projections) keeps it. Each task owns a range of output columns; that range of the m
// output rows is summed in an fp32 scratch (L1) while the k rows of b go by kWeightRows at a time,
// each row's piece read front to back.
constexpr int64_t kColChunk = 512;

// acc[r][0, w) += Σ_{q < Q} x_r[d + q] · B[d + q][0, w) for the M rows, from one group of Q rows of
// B (Bd: row d of B at the chunk's first column).
template <int M, int Q, typename T>
inline void add_rows(const float* x, int64_t ldx, int64_t d, const T* Bd, int64_t ldb, int64_t w,
                     float* acc) {
  using Vec = Vectorized<float>;
  constexpr int64_t L = Vec::size();
  const int64_t wv = w / L * L;
  Vec xb[M][Q];
  for (int r = 0; r < M; ++r)
    for (int q = 0; q < Q; ++q) xb[r][q] = Vec(x[r * ldx + d + q]);
  for (int64_t v = 0; v < wv; v += L) {
    Vec bq[Q];
    for (int q = 0; q < Q; ++q) bq[q] = load_as<float>(Bd + q * ldb + v);
    for (int r = 0; r < M; ++r) {
      Vec o = Vec::loadu(acc + r * kColChunk + v);
      for (int q = 0; q < Q; ++q) o = at::vec::fmadd(xb[r][q], bq[q], o);
      o.store(acc + r * kColChunk + v);
    }
  }
  for (int64_t v = wv; v < w; ++v) {
    for (int r = 0; r < M; ++r) {
      float o = acc[r * kColChunk + v];
      for (int q = 0; q < Q; ++q) o += x[r * ldx + d + q] * static_cast<float>(Bd[q * ldb + v]);
      acc[r * kColChunk + v] = o;
    }
  }
}

template <int M, typename T>
void skinny_rows_in_out(const float* x, int64_t ldx, const T* B, int64_t ldb, int64_t n,
                        int64_t k, const T* bias, T* out, int64_t ldo) {
  constexpr int Q = kWeightRows<M>;
  constexpr int64_t L = Vectorized<float>::size();
  // Column pieces of whole vectors, about four tasks a thread, at most kColChunk wide.
  const int64_t tasks = 4 * at::get_num_threads();
  const int64_t width = std::clamp<int64_t>((n + tasks * L - 1) / (tasks * L) * L, L, kColChunk);
  const int64_t pieces = (n + width - 1) / width;
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[M * kColChunk];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c0 = p * width, w = std::min(width, n - c0);
      for (int r = 0; r < M; ++r) std::fill(acc + r * kColChunk, acc + r * kColChunk + w, 0.f);
      int64_t d = 0;
      for (; d + Q <= k; d += Q) add_rows<M, Q>(x, ldx, d, B + d * ldb + c0, ldb, w, acc);
      for (; d < k; ++d) add_rows<M, 1>(x, ldx, d, B + d * ldb + c0, ldb, w, acc);
      for (int r = 0; r < M; ++r)
        for (int64_t v = 0; v < w; ++v) {
          const float b = bias != nullptr ? static_cast<float>(bias[c0 + v]) : 0.f;
          out[r * ldo + c0 + v] = static_cast<T>(acc[r * kColChunk + v] + b);
        }
    }
  });
}

// Which of the two few-row layouts matmul(a, b) is, if either: b = weight.t() of a row-major
// (n x k) weight (F.linear), or b itself row-major (k x n) (a weight stored (in, out)). Under
// FASTGPT_CPU_GEMM "auto" only: "aten" means ATen's own products, and "onednn" every product on
// oneDNN.
enum class Skinny { kNone, kWeightT, kInOut };

Skinny skinny_layout(const at::Tensor& a, const at::Tensor& b) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m < 1 || m > kSkinnyRows || k == 0 || n == 0 || a.scalar_type() == at::kDouble ||
      gemm::choice().load(std::memory_order_relaxed) != gemm::kAuto)
    return Skinny::kNone;
  if (b.stride(0) == 1 && b.stride(1) >= k) return Skinny::kWeightT;
  if (b.stride(1) == 1 && b.stride(0) >= n) return Skinny::kInOut;
  return Skinny::kNone;
}

template <typename T>
void skinny_matmul(Skinny layout, const at::Tensor& a, const at::Tensor& b,
                   const at::Tensor& bias, at::Tensor& out) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  // The input rows as fp32, contiguous: a few KB, read from L1.
  const at::Tensor x = a.to(at::kFloat).contiguous();
  const float* xp = x.const_data_ptr<float>();
  const T* wp = b.const_data_ptr<T>();
  const T* bp = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  with_count<kSkinnyRows>(m, [&](auto rows) {
    constexpr int M = decltype(rows)::value;
    if (layout == Skinny::kWeightT) {
      skinny_rows<M>(xp, k, wp, b.stride(1), n, k, bp, op, n);
    } else {
      skinny_rows_in_out<M>(xp, k, wp, b.stride(0), n, k, bp, op, n);
    }
  });
}

at::Tensor matmul(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "fastgpt::matmul";
  check_cpu_float(a, op, "a", /*contiguous=*/false);
  check_cpu_float(b, op, "b", /*contiguous=*/false);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": a and b must be 2-D, got shapes ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(0), op, ": a of shape ", a.sizes(), " and b of shape ",
              b.sizes(), " cannot be multiplied (", a.size(1), " != ", b.size(0), ")");
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": b has dtype ", b.scalar_type(),
              " but a has dtype ", a.scalar_type());
  at::Tensor out = empty_output({a.size(0), b.size(1)}, a.options());
  if (bias.has_value()) {
    check_cpu_float(*bias, op, "bias", /*contiguous=*/false);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == b.size(1), op, ": bias must have shape (",
                b.size(1), "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == a.scalar_type(), op, ": bias has dtype ",
                bias->scalar_type(), " but a has dtype ", a.scalar_type());
  }
  const Skinny layout = skinny_layout(a, b);
  if (layout != Skinny::kNone) {
    const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    switch (a.scalar_type()) {
      case at::kFloat: skinny_matmul<float>(layout, a, b, bias_c, out); break;
      case at::kBFloat16: skinny_matmul<c10::BFloat16>(layout, a, b, bias_c, out); break;
      case at::kHalf: skinny_matmul<c10::Half>(layout, a, b, bias_c, out); break;
      default: TORCH_INTERNAL_ASSERT(false, "skinny_layout admits fp32, bf16 and fp16 only");
    }
    return out;
  }
  if (bias.has_value()) {
    gemm::addmm_out(out, *bias, a, b);
  } else {
    gemm::mm_out(out, a, b, /*accumulate=*/false);
  }
  return out;
}

void register_linear(torch::Library& m) { m.impl("matmul", TORCH_FN(matmul)); }

const OpRegistrar registrar(&register_linear);

}  // namespace
}  // namespace fastgpt
