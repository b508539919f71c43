// Linear + cross-entropy: loss = cross_entropy(input @ weight^T + bias, target) without ever
// holding the (N, V) logits whole.
//
// The rows go in chunks through one reused (chunk, V) buffer:
//   1. logits of the chunk        buf = x_c @ W^T (+ b)           (ATen's GEMM: csrc/gemm.h)
//   2. loss and dlogits in place  buf = scale * (softmax - onehot) (the cross-entropy row kernels)
//   3. d_input of the chunk       d_x[c] = buf @ W                 (GEMM)
//      d_weight accumulated       d_W += buf^T @ x_c              (GEMM, beta = 1 after the first)
//      d_bias accumulated         d_b += column sums of buf
// The gradients are those of the reduced loss with grad_output = 1; the backward scales them in
// place. For reduction "none" d_weight cannot be rescaled per row afterwards, so there the forward
// computes the losses only and the backward runs this op again with `row_scale = grad_output`.
// Peak memory beyond inputs and gradients: the chunk buffer.
#include "cross_entropy.h"
#include "gemm.h"
#include "output_memory.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

namespace fastgpt {
namespace {

// Bytes of logits per chunk when the caller leaves the size to us. Large enough that each matrix
// product has hundreds of rows (MKL runs near peak and d_W, read and written once per chunk, is
// touched few times), small next to the (N, V) logits eager holds: 128 MiB is 667 rows of GPT-2's
// 50257 fp32 logits. Measured at 4096 x 768 x 50257 fp32: 640-row chunks ran fwd+bwd ~15% faster
// than 160-row ones.
constexpr int64_t kChunkBytes = int64_t{128} << 20;

int64_t chunk_rows_for(int64_t requested, int64_t N, int64_t V, int64_t elem) {
  int64_t rows = requested > 0 ? requested : kChunkBytes / std::max<int64_t>(1, V * elem);
  rows = std::max<int64_t>(rows, requested > 0 ? 1 : 16);  // matmuls need some height
  return std::max<int64_t>(1, std::min(rows, N));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_opt,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, int64_t reduction,
    const c10::optional<at::Tensor>& row_scale_opt, bool input_grad, bool weight_grad,
    bool bias_grad, int64_t chunk_rows) {
  constexpr const char* op = "fastgpt::linear_cross_entropy_fwd";
  check_cpu_float(input, op, "input");
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-D (rows, in_features), got shape ",
              input.sizes());
  check_cpu_float(weight, op, "linear_weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == input.size(1), op,
              ": linear_weight must have shape (classes, ", input.size(1), "), got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, op, ": linear_weight has no classes (shape ", weight.sizes(),
              ")");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": linear_weight has dtype ",
              weight.scalar_type(), " but input has dtype ", input.scalar_type());
  const int64_t N = input.size(0), C = input.size(1), V = weight.size(0);
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  if (bias.defined()) {
    check_cpu_float(bias, op, "linear_bias");
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == V, op, ": linear_bias must have shape (", V,
                "), got ", bias.sizes());
    TORCH_CHECK(bias.scalar_type() == input.scalar_type(), op, ": linear_bias has dtype ",
                bias.scalar_type(), " but input has dtype ", input.scalar_type());
  }
  TORCH_CHECK(!bias_grad || bias.defined(), op, ": bias_grad requested without a linear_bias");
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong, op,
              ": target must be a CPU int64 tensor of class indices, got ", target.scalar_type(),
              " on ", target.device());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N && target.is_contiguous(), op,
              ": target must be contiguous with shape (", N, "), got ", target.sizes());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  const at::Tensor row_scale = row_scale_opt.has_value() ? *row_scale_opt : at::Tensor();
  if (row_scale.defined()) {
    check_cpu_float(row_scale, op, "row_scale");
    TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == N &&
                    row_scale.scalar_type() == input.scalar_type(),
                op, ": row_scale must have shape (", N, ") and the input's dtype, got ",
                row_scale.sizes(), " ", row_scale.scalar_type());
  }
  TORCH_CHECK(chunk_rows >= 0, op, ": chunk_rows must be >= 0 (0: automatic), got ", chunk_rows);
  const int64_t valid = ce::count_valid_targets(target, V, ignore_index, op);

  const auto opts = input.options();
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({N}, opts.dtype(acc_type));
  at::Tensor d_input = empty_output({input_grad ? N : 0, input_grad ? C : 0}, opts);
  at::Tensor d_weight = empty_output({weight_grad ? V : 0, weight_grad ? C : 0}, opts);
  at::Tensor d_bias_acc = bias_grad ? at::zeros({V}, opts.dtype(acc_type)) : at::Tensor();
  const bool any_grad = input_grad || weight_grad || bias_grad;
  if (weight_grad && N == 0) d_weight.zero_();

  const double scale = reduction == ce::kMean && valid ? 1.0 / static_cast<double>(valid) : 1.0;
  const int64_t R = chunk_rows_for(chunk_rows, N, V, input.element_size());
  at::Tensor buf = empty_output({N ? R : 0, V}, opts);  // written in full by every chunk's product
  const at::Tensor wt = weight.t();
  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    at::Tensor logits = buf.narrow(0, 0, rows);
    const at::Tensor x = input.narrow(0, r0, rows);
    if (bias.defined()) {
      gemm::addmm_out(logits, bias, x, wt);
    } else {
      gemm::mm_out(logits, x, wt, /*accumulate=*/false);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), op, [&] {
      using acc = acc_t<scalar_t>;
      scalar_t* lp = logits.data_ptr<scalar_t>();
      ce::rows_loss_grad<scalar_t>(
          lp, target.const_data_ptr<int64_t>() + r0, rows, V, ignore_index,
          static_cast<acc>(label_smoothing), static_cast<acc>(scale),
          row_scale.defined() ? row_scale.const_data_ptr<scalar_t>() + r0 : nullptr,
          row_loss.data_ptr<acc>() + r0, any_grad ? lp : nullptr);
    });
    if (!any_grad) continue;
    if (input_grad) {
      at::Tensor dx = d_input.narrow(0, r0, rows);
      gemm::mm_out(dx, logits, weight, /*accumulate=*/false);
    }
    if (weight_grad) {
      // For bf16/fp16 d_W is accumulated in its own dtype, one rounding per chunk (ATen's
      // reduced-precision GEMM accumulates each product in fp32).
      gemm::mm_out(d_weight, logits.t(), x, /*accumulate=*/r0 > 0);
    }
    if (bias_grad) d_bias_acc.add_(at::sum(logits, {0}, false, acc_type));
  }

  at::Tensor loss;
  if (reduction == ce::kNone) {
    loss = row_loss.to(input.scalar_type());
  } else {
    double total = 0;
    AT_DISPATCH_FLOATING_TYPES(acc_type, op, [&] {
      const scalar_t* l = row_loss.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < N; ++i) total += static_cast<double>(l[i]);
    });
    // "mean" over no valid rows is 0/0 = nan, as torch gives.
    if (reduction == ce::kMean) total /= static_cast<double>(valid);
    loss = at::empty({}, opts.dtype(at::kDouble)).fill_(total).to(input.scalar_type());
  }
  at::Tensor d_bias =
      bias_grad ? d_bias_acc.to(input.scalar_type()) : at::empty({0}, opts);
  return {loss, d_input, d_weight, d_bias};
}

void register_linear_cross_entropy(torch::Library& m) {
  m.impl("linear_cross_entropy_fwd", TORCH_FN(linear_cross_entropy_fwd));
}

const OpRegistrar registrar(&register_linear_cross_entropy);

}  // namespace
}  // namespace fastgpt
