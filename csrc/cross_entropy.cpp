// Cross-entropy on (N, V) logits with int64 class targets.
//
// Forward: per row one online pass for the log-sum-exp and the loss; when the input needs a
// gradient, a second pass over the row (still in L2) writes the gradient of the *reduced* loss
// with grad_output = 1 straight into a gradient buffer, an extra output of the op (Liger's
// design). The backward then only multiplies that buffer by grad_output, in place. So forward +
// backward read the logits twice (once from memory) and write the gradient once, and the only
// N x V tensor besides the logits is the gradient itself.
#include "cross_entropy.h"

#include <ATen/ops/empty.h>

namespace fastgpt {
namespace {

using at::vec::Vectorized;

#define FASTGPT_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

void check_logits_target(const at::Tensor& logits, const at::Tensor& target, const char* op) {
  check_cpu_float(logits, op, "input");
  TORCH_CHECK(logits.dim() == 2, op, ": input must be 2-D (rows, classes), got shape ",
              logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, op, ": the class dimension is empty (shape ", logits.sizes(),
              ")");
  TORCH_CHECK(target.device().is_cpu(), op, ": target must be a CPU tensor, got ",
              target.device());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op,
              ": target must have shape (", logits.size(0), "), got ", target.sizes());
  TORCH_CHECK(target.is_contiguous(), op, ": target must be contiguous");
}

void check_options(double label_smoothing, int64_t reduction, const char* op) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                     const at::Tensor& target,
                                                     int64_t ignore_index,
                                                     double label_smoothing, int64_t reduction,
                                                     bool compute_grad) {
  constexpr const char* op = "fastgpt::cross_entropy_fwd";
  check_logits_target(logits, target, op);
  check_options(label_smoothing, reduction, op);
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t valid = ce::count_valid_targets(target, V, ignore_index, op);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({N}, logits.options().dtype(acc_type));
  at::Tensor grad = compute_grad ? ce::empty_grad_buffer(N, V, logits.options())
                                 : at::empty({0}, logits.options());
  // "mean" divides by the number of non-ignored rows; 0 of them gives 0/0 = nan, as torch does.
  const double scale = reduction == ce::kMean ? 1.0 / static_cast<double>(valid) : 1.0;
  FASTGPT_DISPATCH_FLOATS(logits.scalar_type(), op, [&] {
    using acc = acc_t<scalar_t>;
    ce::rows_loss_grad<scalar_t>(logits.const_data_ptr<scalar_t>(),
                                 target.const_data_ptr<int64_t>(), N, V, ignore_index,
                                 static_cast<acc>(label_smoothing),
                                 valid ? static_cast<acc>(scale) : acc(0), nullptr,
                                 row_loss.data_ptr<acc>(),
                                 compute_grad ? grad.data_ptr<scalar_t>() : nullptr);
  });
  if (reduction == ce::kNone) return {row_loss.to(logits.scalar_type()), grad};
  // The sum over rows in double, in row order: deterministic and exact enough for any N.
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(acc_type, op, [&] {
    const scalar_t* l = row_loss.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i) total += static_cast<double>(l[i]);
  });
  if (reduction == ce::kMean) total /= static_cast<double>(valid);
  at::Tensor loss = at::empty({}, logits.options().dtype(at::kDouble));
  loss.fill_(total);
  return {loss.to(logits.scalar_type()), grad};
}

// grad *= grad_output, in place: a 0-dim grad_output scales everything (skipped when it is 1, the
// usual case of a loss that is the end of the graph), a (rows,) one scales each row.
void cross_entropy_scale_grad_(at::Tensor& grad, const at::Tensor& grad_output) {
  constexpr const char* op = "fastgpt::cross_entropy_scale_grad_";
  check_cpu_float(grad, op, "grad");
  check_cpu_float(grad_output, op, "grad_output");
  // grad's own dtype, or fp32 for a bf16/fp16 grad: a later backward through a retained graph
  // passes a ratio of two scales, which should not be rounded to 8 bits first.
  const bool reduced = grad.scalar_type() == at::kBFloat16 || grad.scalar_type() == at::kHalf;
  TORCH_CHECK(grad_output.scalar_type() == grad.scalar_type() ||
                  (reduced && grad_output.scalar_type() == at::kFloat),
              op, ": grad_output has dtype ", grad_output.scalar_type(), " but grad has dtype ",
              grad.scalar_type(), " (fp32 is also accepted for bf16/fp16)");
  const bool per_row = grad_output.dim() == 1;
  TORCH_CHECK(grad_output.dim() == 0 || (per_row && grad.dim() == 2 &&
                                         grad_output.size(0) == grad.size(0)),
              op, ": grad_output must be 0-dim or have one value per row of grad (shape ",
              grad.sizes(), "), got ", grad_output.sizes());
  if (grad.numel() == 0) return;
  FASTGPT_DISPATCH_FLOATS(grad.scalar_type(), op, [&] {
    using P = ce::Pair<scalar_t>;
    using acc = typename P::acc;
    using Vec = typename P::Vec;
    scalar_t* g = grad.data_ptr<scalar_t>();
    // The factors as acc values (a copy of at most `rows` elements).
    const at::Tensor go = grad_output.to(c10::CppTypeToScalarType<acc>::value);
    const acc* s = go.const_data_ptr<acc>();
    auto scale_span = [](scalar_t* p, int64_t n, acc k) {
      const Vec vk(k);
      int64_t i = 0;
      for (; i + P::kStep <= n; i += P::kStep) {
        Vec a, b;
        P::load(p + i, a, b);
        P::store(p + i, a * vk, b * vk);
      }
      for (; i < n; ++i) p[i] = static_cast<scalar_t>(static_cast<acc>(p[i]) * k);
    };
    if (!per_row) {
      const acc k = s[0];
      if (k == acc(1)) return;
      at::parallel_for(0, grad.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
        scale_span(g + begin, end - begin, k);
      });
    } else {
      const int64_t V = grad.size(1);
      at::parallel_for(0, grad.size(0), row_grain(V), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) scale_span(g + r * V, V, s[r]);
      });
    }
  });
}

void register_cross_entropy(torch::Library& m) {
  m.impl("cross_entropy_fwd", TORCH_FN(cross_entropy_fwd));
  m.impl("cross_entropy_scale_grad_", TORCH_FN(cross_entropy_scale_grad_));
}

const OpRegistrar registrar(&register_cross_entropy);

}  // namespace
}  // namespace fastgpt
