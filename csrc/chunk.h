// Chunk<scalar_t>: a row walked two acc vectors at a time, in its storage dtype.
//
// For fp32/fp64 a chunk is two Vectorized<acc> loads; for bf16/fp16 it is exactly one
// Vectorized<scalar_t>, widened to two fp32 vectors in registers (no scratch row) and narrowed
// once on the way out. The elementwise kernels (GELU, LayerNorm) share it so that the dtype
// handling, the masked tails and the non-temporal stores are written once.
#pragma once

#include "common.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <tuple>

namespace fastgpt {

template <typename scalar_t>
struct Chunk {
  using acc = acc_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc>;
  static constexpr int64_t W = Vec::size();
  static constexpr int64_t size = 2 * W;
  static_assert(!is_reduced_v<scalar_t> || at::vec::Vectorized<scalar_t>::size() == size);

  // Exactly `size` elements: no length branches (the loops' fast path).
  static void load(const scalar_t* p, Vec& lo, Vec& hi) {
    if constexpr (is_reduced_v<scalar_t>) {
      std::tie(lo, hi) =
          at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
    } else {
      lo = Vec::loadu(p);
      hi = Vec::loadu(p + W);
    }
  }
  static void store(scalar_t* p, const Vec& lo, const Vec& hi) {
    if constexpr (is_reduced_v<scalar_t>) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
    } else {
      lo.store(p);
      hi.store(p + W);
    }
  }

  // n <= size elements; lanes past n read as 0 and are not written.
  static void load(const scalar_t* p, int64_t n, Vec& lo, Vec& hi) {
    if constexpr (is_reduced_v<scalar_t>) {
      using sVec = at::vec::Vectorized<scalar_t>;
      auto v = n == size ? sVec::loadu(p) : sVec::loadu(p, n);
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(v);
    } else if (n == size) {
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
      n == size ? v.store(p) : v.store(p, n);
    } else if (n == size) {
      lo.store(p);
      hi.store(p + W);
    } else {
      lo.store(p, std::min(n, W));
      if (n > W) hi.store(p + W, n - W);
    }
  }

  // The same for an acc-typed row (per-thread partials), n <= size.
  static void load_acc(const acc* p, int64_t n, Vec& lo, Vec& hi) {
    lo = Vec::loadu(p, std::min(n, W));
    hi = n > W ? Vec::loadu(p + W, n - W) : Vec(acc(0));
  }
  static void store_acc(acc* p, int64_t n, const Vec& lo, const Vec& hi) {
    lo.store(p, std::min(n, W));
    if (n > W) hi.store(p + W, n - W);
  }

  // Rounds lo/hi to scalar_t's precision in registers (a no-op for fp32/fp64).
  static void round(Vec& lo, Vec& hi) {
    if constexpr (is_reduced_v<scalar_t>) {
      std::tie(lo, hi) =
          at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(lo, hi));
    }
  }
  // Stores lo/hi rounded to scalar_t and leaves them holding the rounded values.
  static void store_rounded(scalar_t* p, Vec& lo, Vec& hi) {
    if constexpr (is_reduced_v<scalar_t>) {
      const auto packed = at::vec::convert_from_float<scalar_t>(lo, hi);
      packed.store(p);
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(packed);
    } else {
      lo.store(p);
      hi.store(p + W);
    }
  }
  // As store, but non-temporal: the lines go to memory without first being read into the cache
  // (a normal store to a line not in cache reads it first, so a streamed output costs 1x its
  // bytes of memory traffic instead of 2x). Each vector's address must be aligned to its size;
  // the caller checks that for the whole output.
  static void stream(scalar_t* p, const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (is_reduced_v<scalar_t>) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p),
                          __m512i(at::vec::convert_from_float<scalar_t>(lo, hi)));
      return;
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_stream_ps(p, __m512(lo));
      _mm512_stream_ps(p + W, __m512(hi));
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (is_reduced_v<scalar_t>) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p),
                          __m256i(at::vec::convert_from_float<scalar_t>(lo, hi)));
      return;
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(p, __m256(lo));
      _mm256_stream_ps(p + W, __m256(hi));
      return;
    }
#endif
    store(p, lo, hi);
  }
};

}  // namespace fastgpt
