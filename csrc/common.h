// Shared helpers for fastgpt's CPU kernels.
//
// Every kernel file is compiled three times (DEFAULT, AVX2, AVX512: see setup.py), so anything
// vectorized here must only use at::vec, whose width follows the CPU_CAPABILITY_* define.
// Kept on the light ATen headers: torch/extension.h would cost ~35 s per file to compile.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastgpt {

// fp32 accumulation for every floating type except double (used by gradcheck), which keeps
// double: "bf16/fp16 inputs are computed in fp32 and rounded once".
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
constexpr bool is_reduced_v =
    std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

// Widen a bf16/fp16 row into an fp32 scratch row.
template <typename scalar_t>
inline void widen_row(const scalar_t* src, float* dst, int64_t n) {
  using bVec = at::vec::Vectorized<scalar_t>;
  using fVec = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + bVec::size() <= n; i += bVec::size()) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(bVec::loadu(src + i));
    lo.store(dst + i);
    hi.store(dst + i + fVec::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Round an fp32 row once into bf16/fp16.
template <typename scalar_t>
inline void narrow_row(const float* src, scalar_t* dst, int64_t n) {
  using bVec = at::vec::Vectorized<scalar_t>;
  using fVec = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + bVec::size() <= n; i += bVec::size()) {
    auto v = at::vec::convert_from_float<scalar_t>(fVec::loadu(src + i),
                                                   fVec::loadu(src + i + fVec::size()));
    v.store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// Horizontal sum of a vector register.
template <typename T>
inline T hsum(const at::vec::Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](auto& a, auto& b) { return a + b; }, v);
}

// Vectorized<acc>::size() consecutive values as acc (bf16/fp16 widened to fp32 in registers).
template <typename acc, typename T>
inline at::vec::Vectorized<acc> load_as(const T* p) {
  if constexpr (std::is_same_v<acc, T>) {
    return at::vec::Vectorized<acc>::loadu(p);
  } else {
    at::vec::Vectorized<float> out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

// f(std::integral_constant<int, n>{}) for 1 <= n <= Max: a small run-time count (the rows of a
// register block) as a compile-time constant, so that the loops over it unroll and their
// accumulators stay in registers.
template <int Max, typename F>
inline void with_count(int64_t n, F&& f) {
  if constexpr (Max > 1) {
    if (n == Max) return f(std::integral_constant<int, Max>{});
    with_count<Max - 1>(n, std::forward<F>(f));
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// ATen's grain: a parallel task should touch at least ~32K elements to be worth a thread.
constexpr int64_t kGrainSize = 32768;

// Rows per at::parallel_for task so that each task touches ~kGrainSize elements.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, row_len));
}

// Input checks shared by the kernels: each raises a Python RuntimeError with a clear message.
// `contiguous = false` for operands of a matrix product, which ATen reads in any layout.
inline void check_cpu_float(const at::Tensor& t, const char* op, const char* name,
                            bool contiguous = true) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kHalf || t.scalar_type() == at::kDouble,
              op, ": ", name, " must be float32, bfloat16, float16 or float64, got ",
              t.scalar_type());
  TORCH_CHECK(!contiguous || t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* op,
                       const char* name_a, const char* name_b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_b, " has dtype ",
              b.scalar_type(), " but ", name_a, " has dtype ", a.scalar_type());
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", name_b, " has shape ", b.sizes(), " but ",
              name_a, " has shape ", a.sizes());
}

// Each op file registers its CPU kernels by defining, at namespace scope,
//   static const fastgpt::OpRegistrar registrar(&register_my_op);
// register.cpp then calls every collected function; no shared list needs editing per op.
using RegisterFn = void (*)(torch::Library&);
std::vector<RegisterFn>& op_registrars();
struct OpRegistrar {
  explicit OpRegistrar(RegisterFn fn) { op_registrars().push_back(fn); }
};

}  // namespace fastgpt
