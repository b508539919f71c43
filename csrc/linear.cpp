// The matrix product of a linear layer: out = a · b [+ bias], through csrc/gemm.h, which sends
// fp32 products to oneDNN where MKL would run slower kernels (see there).
//
// a (m, k), b (k, n), bias (n,) or none, one floating dtype, CPU. a and b may be any 2-D views:
// a row-major tensor or the transpose of one is read in place (linear's forward reads weightᵀ,
// its backward doutᵀ); other layouts are copied. out is a fresh contiguous (m, n) tensor.
// The autograd side (fastgpt/ops/linear.py, fastgpt/ops/_linear.py) builds F.linear and its
// three gradients from this one op.
#include "common.h"
#include "gemm.h"
#include "output_memory.h"

namespace fastgpt {
namespace {

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
