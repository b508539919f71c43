// Matrix products for the CPU kernels: ATen's, from whichever of its two GEMM libraries is
// faster for fp32 on the running CPU.
//
// Why: ATen's fp32 at::mm calls MKL's sgemm, and MKL chooses its code path by CPU vendor: on AMD
// CPUs with AVX-512 (Zen 4, Zen 5) it runs its AVX2 kernels. ATen also ships oneDNN, which it
// uses for bf16/fp16 products, and oneDNN's fp32 matmul picks its kernels by instruction set
// alone (AVX-512 brgemm there). Measured on this project's 2-core Zen 5 machine, fp32, 2 threads
// (PyTorch 2.13): GPT-2's linear shapes (2048 rows, 768-3072 wide) ran at 280-400 GFLOP/s through
// oneDNN against 170-190 through MKL, and a 667 x 768 x 50257 logits chunk at 237 against 145.
// Small products favour MKL: oneDNN spends ~15-20 us per call creating its primitive (cached)
// and wrapping the memory, so below kOneDnnMinWork (m·n·k) the product stays on MKL.
//
// The oneDNN entry is at::native::mkldnn_matmul, the kernel behind ATen's own bf16 products. Its
// header is not installed with torch, so it is declared here, weakly: a torch without the symbol
// loads fastgpt all the same and every product goes to at::mm. It computes in fp32 with fp32
// accumulation (oneDNN's default "strict" math mode); under torch.set_float32_matmul_precision
// ("medium") it uses bf16 arithmetic, as ATen's matmuls then do too. Results equal MKL's to fp32
// rounding, not bit for bit (the summation order differs).
//
// Choice (FASTGPT_CPU_GEMM, or fastgpt._cpu.use_gemm() at run time):
//   auto    oneDNN for fp32 products of at least kOneDnnMinWork when the CPU has AVX-512 and
//           torch.backends.mkldnn is enabled; MKL otherwise (the default)
//   onednn  as auto, without the size threshold or the shape budgets (onednn_admits,
//           brgemm_admits): the tests use it to cover every shape on oneDNN and brgemm
//   aten    always at::mm (MKL): ATen's eager behaviour; the block products too (sgemm, not
//           brgemm), so the tests cover both paths of block_mm
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <cpuinfo.h>  // torch's copy, exported by libc10

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_set>

namespace at::native {
// aten/src/ATen/native/mkldnn/Matmul.h: result = alpha * mat1 @ mat2 + beta * result.
__attribute__((weak)) void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2,
                                         const at::Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace fastgpt::gemm {

enum Choice : int { kAuto = 0, kOneDnn = 1, kAten = 2 };

// Products with m·n·k below this stay on MKL under "auto": oneDNN's per-call cost (~15-20 us)
// is then a large share of the product (measured: 64³ took 22 us against MKL's 7; from
// 128 x 64 x 256 on, oneDNN was as fast or faster).
constexpr int64_t kOneDnnMinWork = int64_t{1} << 21;

inline int choice_from_env() {
  const char* v = std::getenv("FASTGPT_CPU_GEMM");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return kAuto;
  if (std::strcmp(v, "onednn") == 0) return kOneDnn;
  if (std::strcmp(v, "aten") == 0) return kAten;
  return -1;  // reported by fastgpt._cpu, which validates the variable before loading a build
}

// One per build (.so): an inline function's static is shared by every file of the build.
inline std::atomic<int>& choice() {
  static std::atomic<int> c{std::max(choice_from_env(), int{kAuto})};  // -1 (invalid): auto
  return c;
}

// Whether oneDNN's fp32 matmul can run here: the symbol resolved, a CPU it has AVX-512 kernels
// for (mkldnn_matmul itself refuses fp32 without avx512bw/vl/dq), and not switched off through
// torch.backends.mkldnn.
inline bool onednn_usable() {
  static const bool cpu_ok = &at::native::mkldnn_matmul != nullptr && at::hasMKLDNN() &&
                             cpuinfo_initialize() && cpuinfo_has_x86_avx512f() &&
                             cpuinfo_has_x86_avx512bw() && cpuinfo_has_x86_avx512vl() &&
                             cpuinfo_has_x86_avx512dq();
  return cpu_ok && at::globalContext().userEnabledMkldnn();
}

// The distinct product shapes a library may still be given: the first `cap` keys (sizes, leading
// dims, flags) are admitted, and after them only keys already admitted. Not locked: callers
// keep one per thread or lock it.
template <size_t N>
class ShapeBudget {
 public:
  using Key = std::array<int64_t, N>;
  explicit ShapeBudget(size_t cap) : cap_(cap) {}
  bool admits(const Key& key) {
    if (shapes_.count(key) != 0) return true;
    if (shapes_.size() >= cap_) return false;
    shapes_.insert(key);
    return true;
  }

 private:
  struct Hash {
    size_t operator()(const Key& a) const {
      uint64_t h = 0x9E3779B97F4A7C15ULL;
      for (int64_t v : a) h = (h ^ static_cast<uint64_t>(v)) * 0x100000001B3ULL;
      return static_cast<size_t>(h);
    }
  };
  size_t cap_;
  std::unordered_set<Key, Hash> shapes_;
};

// Whether the product out = [out +] a · b may go to oneDNN, by its shape. ATen's mkldnn_matmul
// creates a oneDNN primitive (JIT code, ~0.5 MB) for every distinct shape and layout and keeps it
// in two caches (ideep's, LRU_CACHE_CAPACITY, and oneDNN's, ONEDNN_PRIMITIVE_CACHE_CAPACITY;
// 1024 entries each by default), so products whose row count follows the batch's token count
// (prefill and evaluation at varying lengths) grew the process by ~1.5 MB per new count:
// F.linear 768 -> 768 fwd+bwd at 550 row counts, +846 MB; eager (MKL) +26 MB. A GPT-2 training
// step needs ~20 shapes; the first kOneDnnShapes distinct ones of the process go to oneDNN and
// later ones to MKL (eager's library), which bounds that memory at ~kOneDnnShapes x 0.5 MB.
constexpr size_t kOneDnnShapes = 64;

inline bool onednn_admits(const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (choice().load(std::memory_order_relaxed) == kOneDnn) return true;  // asked for: no budget
  static std::mutex mu;
  static ShapeBudget<8> budget(kOneDnnShapes);
  std::lock_guard<std::mutex> lock(mu);
  return budget.admits({a.size(0), a.size(1), b.size(1), a.stride(0), a.stride(1), b.stride(0),
                        b.stride(1), accumulate});
}

// The library that runs an (m x k) · (k x n) product of dtype `dtype`.
//
// A single row (m = 1, a matrix-vector product: bound by reading b, nothing for oneDNN to win)
// always stays on MKL: with one row, the sum post-op (beta = 1, which the bias and accumulating
// paths use) made mkldnn_matmul in torch 2.13 write outside the output for some shapes (seen at
// k >= 2048 with b transposed: wrong values, then glibc's heap-corruption abort). With 2 to 128
// rows, a sweep of 1600 shapes and layouts (k 64-8192, n 1-2304, beta 0 and 1, either operand
// transposed; 1 and 2 threads) left canary rows around the output untouched and the values right
// (tests/test_linear.py keeps a case of each).
inline bool use_onednn(at::ScalarType dtype, int64_t m, int64_t n, int64_t k) {
  const int c = choice().load(std::memory_order_relaxed);
  if (c == kAten || dtype != at::kFloat || m <= 1 || n == 0 || k == 0) return false;
  if (c == kAuto && m * n * k < kOneDnnMinWork) return false;
  return onednn_usable();
}

// out (m x n) = [out +] a (m x k) · b (k x n). `out` must be row-major with unit column stride
// for oneDNN (a contiguous tensor or a block of whole rows of one; other outputs go to MKL); a
// and b any 2-D CPU tensors of out's dtype. Operands that are row-major or the transpose of a
// contiguous tensor are read in place by both libraries; others are copied first.
inline void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (use_onednn(out.scalar_type(), m, n, k) && out.is_contiguous() &&
      onednn_admits(a, b, accumulate)) {
    at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
    return;
  }
  // at::cpu:: calls the CPU kernels of at::mm_out / at::addmm_out directly, without a trip
  // through the dispatcher (a few us per call, which block products notice).
  if (accumulate) {
    at::cpu::addmm_out(out, out, a, b);
  } else {
    at::cpu::mm_out(out, a, b);
  }
}

// Row-major block products on raw memory, C (m x n) = [C +] A (m x k) · B (k x n), for kernels
// that issue thousands of small products per call (attention's 64-256 row blocks). Operands are
// never transposed: callers lay out what needs it once (attention keeps Kᵀ, Qᵀ and dOᵀ panels).
//
// fp32: ATen's batch-reduce GEMM (at::native::cpublas::brgemm, oneDNN's brgemm ukernel: JIT code
// for the running CPU's widest vectors, generated once per shape and cached per thread, for up
// to kBrgemmShapes shapes a thread (brgemm_admits); MKL's sgemm where the ukernel is not built
// in). Measured on the 2-core Zen 5 (AVX-512) machine, one
// thread, blocks of 64-256 x 64-256 x 64-256: brgemm 110-230 GFLOP/s, MKL's sgemm 47-97 (MKL runs
// its AVX2 kernels on AMD CPUs), oneDNN's matmul 34-100 (it creates or looks up a primitive and
// wraps the memory on every call, ~15-20 us). On the 2-core Intel (AVX-512) machine brgemm and
// MKL ran alike (25 and 24 us for 128 x 256 x 64), oneDNN's matmul at 41 us.
// fp64 (gradcheck): MKL's dgemm_, the BLAS ATen's own double products end in (exported by
// torch's CPU wheels; declared weakly, at::cpu::mm_out on views where it is missing).
}  // namespace fastgpt::gemm

extern "C" {
__attribute__((weak)) void dgemm_(const char* transa, const char* transb, const int* m,
                                  const int* n, const int* k, const double* alpha,
                                  const double* a, const int* lda, const double* b,
                                  const int* ldb, const double* beta, double* c, const int* ldc);
__attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m,
                                  const int* n, const int* k, const float* alpha,
                                  const float* a, const int* lda, const float* b, const int* ldb,
                                  const float* beta, float* c, const int* ldc);
}

namespace fastgpt::gemm {

// Whether this thread runs an fp32 block product of this shape on brgemm. ATen JIT-compiles a
// brgemm kernel for every distinct (m, n, k, lda, ldb, ldc, accumulate) and keeps it in a
// per-thread cache that it never empties, so products whose shapes follow the sequence length
// grew the process for good: attention fwd+bwd at every T from 50 to 400, 2 threads, +256 MB
// (2917 shapes), and +608 MB by T = 700. One training shape needs a few dozen kernels (six
// (B, H, T) fwd+bwd cases: 60); under "auto" each thread sends its first kBrgemmShapes distinct
// shapes to brgemm and later ones to MKL's sgemm (up to half the speed on small blocks here, no
// cache), which bounds that memory at ~kBrgemmShapes x 45 KB a thread (measured with 512: +44 MB,
// flat from T = 200 to 700).
constexpr size_t kBrgemmShapes = 256;

inline bool brgemm_admits(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                          bool accumulate) {
  thread_local ShapeBudget<7> budget(kBrgemmShapes);
  return budget.admits({m, n, k, lda, ldb, ldc, accumulate});
}

// The Fortran BLAS entry of one precision (sgemm_, dgemm_).
template <typename T>
using BlasGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*,
                          const T*, const int*, const T*, const int*, const T*, T*, const int*);

// Row-major C = [C +] A·B through the BLAS entry `gemm`; false (nothing done) when the symbol is
// missing or a size does not fit BLAS's int. Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ, and
// row-major memory read as column-major is the transpose: so B goes first, untransposed, then A.
template <typename T>
inline bool blas_mm(BlasGemm<T> gemm, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda,
                    const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (gemm == nullptr || std::max({m, n, k, lda, ldb, ldc}) > kMax) return false;
  const int mi = m, ni = n, ki = k, ldai = lda, ldbi = ldb, ldci = ldc;
  const T one = 1, beta = accumulate ? 1 : 0;
  gemm("N", "N", &ni, &mi, &ki, &one, B, &ldbi, A, &ldai, &beta, C, &ldci);
  return true;
}

// m, n, k > 0; lda >= k, ldb >= n, ldc >= n.
inline void block_mm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B,
                     int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int c = choice().load(std::memory_order_relaxed);
  const bool mkl = c == kAten || (c == kAuto && !brgemm_admits(m, n, k, lda, ldb, ldc, accumulate));
  if (mkl && blas_mm<float>(&sgemm_, m, n, k, A, lda, B, ldb, C, ldc, accumulate)) return;
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

inline void block_mm(int64_t m, int64_t n, int64_t k, const double* A, int64_t lda,
                     const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  if (blas_mm<double>(&dgemm_, m, n, k, A, lda, B, ldb, C, ldc, accumulate)) return;
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  const at::Tensor a = at::from_blob(const_cast<double*>(A), {m, k}, {lda, 1}, opts);
  const at::Tensor b = at::from_blob(const_cast<double*>(B), {k, n}, {ldb, 1}, opts);
  if (accumulate) {
    at::cpu::addmm_out(c, c, a, b);
  } else {
    at::cpu::mm_out(c, a, b);
  }
}

// out (m x n) = bias (n, broadcast over the rows) + a · b; out as for mm_out.
inline void addmm_out(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a,
                      const at::Tensor& b) {
  if (use_onednn(out.scalar_type(), a.size(0), b.size(1), a.size(1)) && out.is_contiguous() &&
      onednn_admits(a, b, /*accumulate=*/true)) {
    out.copy_(bias.expand_as(out));  // what ATen's addmm does too: bias first, then beta = 1
    at::native::mkldnn_matmul(a, b, out, 1.0f, 1.0f);
    return;
  }
  at::cpu::addmm_out(out, bias, a, b);
}

}  // namespace fastgpt::gemm
