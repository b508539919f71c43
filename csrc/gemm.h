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
//   onednn  as auto, without the size threshold (the tests use it to cover every shape)
//   aten    always at::mm (MKL): ATen's eager behaviour
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <cpuinfo.h>  // torch's copy, exported by libc10

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

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
// for oneDNN (a contiguous tensor or a block of whole rows of one; other outputs go to MKL); a and b
// any 2-D CPU tensors of out's dtype. Operands that are row-major or the transpose of a contiguous
// tensor are read in place by both libraries; others are copied first.
inline void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (use_onednn(out.scalar_type(), m, n, k) && out.is_contiguous()) {
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

// The same product, always on MKL: for kernels that issue thousands of small products per call
// (attention's 64-256 row blocks). oneDNN's matmul creates (or looks up) a primitive and wraps the
// memory on every call, ~15-20 us; measured on the 2-core Intel (AVX-512) machine, one thread, a
// 128 x 256 x 64 block took 41 us through oneDNN against 24 us through MKL, and causal attention
// at B=2, H=12, T=1024, D=64 went from 19.5 to 13.5 ms forward when its blocks left oneDNN.
inline void block_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                         bool accumulate) {
  if (accumulate) {
    at::cpu::addmm_out(out, out, a, b);
  } else {
    at::cpu::mm_out(out, a, b);
  }
}

// out (m x n) = bias (n, broadcast over the rows) + a · b; out as for mm_out.
inline void addmm_out(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a,
                      const at::Tensor& b) {
  if (use_onednn(out.scalar_type(), a.size(0), b.size(1), a.size(1)) && out.is_contiguous()) {
    out.copy_(bias.expand_as(out));  // what ATen's addmm does too: bias first, then beta = 1
    at::native::mkldnn_matmul(a, b, out, 1.0f, 1.0f);
    return;
  }
  at::cpu::addmm_out(out, bias, a, b);
}

}  // namespace fastgpt::gemm
