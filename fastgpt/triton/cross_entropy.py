"""Cross-entropy, and linear + cross-entropy, on CUDA (Triton; proven on CPU by the interpreter).

Per row z of V logits with target t and label smoothing eps:

    lse  = log(sum_c exp(z_c))                                   one online pass over the row
    loss = lse - (1 - eps) * z_t - eps / V * sum_c z_c
    grad = scale * (softmax(z) - (1 - eps) * onehot(t) - eps / V)  a second pass, written out

`_cross_entropy_kernel`: one program per row, looping over the row in BLOCK_V blocks with a
running max and sum of exp (fp32 whatever the logits' dtype). When a gradient is wanted it makes a
second pass (the row, at most a few hundred KB, mostly still in L2) and writes the gradient of the
reduced loss for grad_output = 1 into the gradient buffer, an extra output of the forward; the
backward scales it in place. `scale` folds in "mean" (1 / #valid rows) and, for the linear +
cross-entropy backward of reduction "none", a per-row factor. Rows whose target is ignore_index
get loss 0 and a zero gradient. The buffer may be the logits themselves (linear + cross-entropy
overwrites its chunk of logits with their gradient).

Targets are validated by the launcher before any kernel reads a logit (one small reduction and a
host sync); the kernel clamps the index anyway, so a bad index can never read out of bounds.

Linear + cross-entropy: rows in chunks through one reused (chunk, V) buffer, sized from a memory
budget; the matrix products go to cuBLAS through torch between kernel calls (see
fastgpt/ops/linear_cross_entropy.py for the op's contract).

Cost per row of V elements (e bytes each): reads V*e (twice with the gradient, the second mostly
from L2), writes V*e of gradient; ~6 flops per element per pass plus the exps.
"""

import torch
import triton
import triton.language as tl

# Block of a row processed at once. 4096 fp32 values keep 16 per thread at 8 warps: the loop body
# stays in registers without spills while a 50257-wide row takes 13 iterations.
MAX_BLOCK_V = 4096
_NUM_WARPS = 8
# Logits buffer of one linear + cross-entropy chunk on CUDA.
_CHUNK_BYTES = 256 << 20

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels take


@triton.jit
def _cross_entropy_kernel(
    Logits,  # (N, V) logits
    Target,  # (N,) int64
    RowLoss,  # (N,) fp32 loss of each row (0 for ignored rows)
    Grad,  # (N, V) gradient, written only if COMPUTE_GRAD; may be Logits itself
    RowScale,  # (N,) extra per-row gradient factor, read only if HAS_ROW_SCALE
    stride_logits_row,
    stride_grad_row,
    V,
    ignore_index,
    label_smoothing,
    scale,  # gradient scale of every row (1 / #valid rows for "mean")
    COMPUTE_GRAD: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Logits + row * stride_logits_row
    t = tl.load(Target + row)
    valid = t != ignore_index
    # The launcher has validated the targets; clamping keeps even a bad one in bounds.
    t_safe = tl.minimum(tl.maximum(tl.where(valid, t, 0), 0), V - 1)
    # The running max starts at the lowest finite fp32, not -inf, so that rescaling by
    # exp(old - new) never computes -inf - (-inf) on rows of -inf logits.
    m = tl.full([], -3.4028234663852886e38, tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    sum_z = tl.zeros([], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(s)
    z_t = tl.load(z_row + t_safe).to(tl.float32)
    loss = lse - (1.0 - label_smoothing) * z_t
    if HAS_SMOOTHING:
        loss -= label_smoothing / V * sum_z
    tl.store(RowLoss + row, tl.where(valid, loss, 0.0))

    if COMPUTE_GRAD:
        k = tl.where(valid, scale, 0.0)
        if HAS_ROW_SCALE:
            k = k * tl.load(RowScale + row).to(tl.float32)
        off = k * label_smoothing / V
        g_row = Grad + row * stride_grad_row
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) * k - off
            g = tl.where(cols == t_safe, g - k * (1.0 - label_smoothing), g)
            # An ignored row: k = 0 makes g 0, but exp(-inf - lse) * 0 style nans are cut too.
            g = tl.where(valid, g, 0.0)
            tl.store(g_row + cols, g.to(Grad.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _block_v(V):
    return min(triton.next_power_of_2(V), MAX_BLOCK_V)


def _num_warps(block):
    # ~16 elements per thread at the largest block; short rows get fewer warps, not idle ones.
    return max(1, min(_NUM_WARPS, block // 512))


def _check_targets(target, V, ignore_index, op):
    """Raise before any kernel runs if a target is out of range; return #valid rows (a tensor)."""
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= V))
    if bool(bad.any()):  # one host sync: the price of a clear error instead of a device assert
        row = int(bad.nonzero()[0, 0])
        raise RuntimeError(
            f"{op}: target {int(target[row])} at row {row} is out of range [0, {V}) and is not "
            f"ignore_index ({ignore_index})"
        )
    return valid.sum()


def _check(logits, target, label_smoothing, reduction, op):
    if logits.dtype not in _DTYPES:
        raise RuntimeError(f"{op}: input must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] == 0 or not logits.is_contiguous():
        raise RuntimeError(f"{op}: input must be 2-D, contiguous, with classes, got {logits.shape}")
    if target.dtype != torch.int64 or tuple(target.shape) != (logits.shape[0],):
        raise RuntimeError(f"{op}: target must be int64 of shape ({logits.shape[0]},)")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in (0, 1, 2):
        raise RuntimeError(f"{op}: reduction must be 0 (none), 1 (mean) or 2 (sum)")


def _launch_rows(logits, target, grad, row_loss, row_scale, ignore_index, label_smoothing, scale):
    N, V = logits.shape
    if N == 0:
        return
    _cross_entropy_kernel[(N,)](
        logits,
        target,
        row_loss,
        grad if grad is not None else logits,
        row_scale if row_scale is not None else row_loss,
        logits.stride(0),
        grad.stride(0) if grad is not None else 0,
        V,
        ignore_index,
        float(label_smoothing),
        float(scale),
        COMPUTE_GRAD=grad is not None,
        HAS_SMOOTHING=label_smoothing != 0.0,
        HAS_ROW_SCALE=row_scale is not None,
        BLOCK_V=_block_v(V),
        num_warps=_num_warps(_block_v(V)),
    )


def _reduce(row_loss, valid, reduction, dtype):
    if reduction == 0:
        return row_loss.to(dtype)
    total = row_loss.double().sum()
    if reduction == 1:
        total = total / valid.double()  # 0 valid rows: 0/0 = nan, as torch gives
    return total.to(dtype)


def cross_entropy_fwd(logits, target, ignore_index, label_smoothing, reduction, compute_grad):
    """(loss, grad): see fastgpt/ops/cross_entropy.py. The "mean" gradient scale 1/#valid is known
    only on the device; it is read once, with the target check's sync."""
    op = "fastgpt::cross_entropy_fwd"
    _check(logits, target, label_smoothing, reduction, op)
    N, V = logits.shape
    valid = _check_targets(target, V, ignore_index, op)
    n_valid = int(valid)
    scale = 1.0 / n_valid if reduction == 1 and n_valid else 1.0
    row_loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    _launch_rows(
        logits,
        target,
        grad if compute_grad else None,
        row_loss,
        None,
        ignore_index,
        label_smoothing,
        scale,
    )
    return _reduce(row_loss, valid, reduction, logits.dtype), grad


def cross_entropy_scale_grad_(grad, grad_output):
    """grad *= grad_output in place (0-dim, or one value per row)."""
    if grad_output.dim() == 1:
        grad.mul_(grad_output[:, None])
    else:
        grad.mul_(grad_output)


def linear_cross_entropy_fwd(
    input,
    weight,
    bias,
    target,
    ignore_index,
    label_smoothing,
    reduction,
    row_scale,
    input_grad,
    weight_grad,
    bias_grad,
    chunk_rows,
):
    """(loss, d_input, d_weight, d_bias): see fastgpt/ops/linear_cross_entropy.py."""
    op = "fastgpt::linear_cross_entropy_fwd"
    if weight.dim() != 2 or input.dim() != 2 or weight.shape[1] != input.shape[1]:
        raise RuntimeError(f"{op}: input (N, C) and linear_weight (V, C) do not match")
    N, C = input.shape
    V = weight.shape[0]
    if input.dtype not in _DTYPES or weight.dtype != input.dtype:
        raise RuntimeError(f"{op}: input and linear_weight must share a float16/32 or bf16 dtype")
    if target.dtype != torch.int64 or tuple(target.shape) != (N,):
        raise RuntimeError(f"{op}: target must be int64 of shape ({N},)")
    valid = _check_targets(target, V, ignore_index, op)
    n_valid = int(valid)
    scale = 1.0 / n_valid if reduction == 1 and n_valid else 1.0
    any_grad = input_grad or weight_grad or bias_grad
    row_loss = torch.empty(N, dtype=torch.float32, device=input.device)
    d_input = input.new_empty((N, C) if input_grad else (0, 0))
    d_weight = input.new_empty((V, C) if weight_grad else (0, 0))
    d_bias = torch.zeros(V if bias_grad else 0, dtype=torch.float32, device=input.device)
    if weight_grad and N == 0:
        d_weight.zero_()
    rows = chunk_rows or max(16, _CHUNK_BYTES // (V * input.element_size()))
    rows = max(1, min(rows, N))
    buf = input.new_empty((rows if N else 0, V))
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        logits = buf[: r1 - r0]
        x = input[r0:r1]
        if bias is not None:
            torch.addmm(bias, x, weight.t(), out=logits)
        else:
            torch.mm(x, weight.t(), out=logits)
        _launch_rows(
            logits,
            target[r0:r1],
            logits if any_grad else None,  # the gradient overwrites the chunk's logits
            row_loss[r0:r1],
            None if row_scale is None else row_scale[r0:r1],
            ignore_index,
            label_smoothing,
            scale,
        )
        if input_grad:
            torch.mm(logits, weight, out=d_input[r0:r1])
        if weight_grad:
            if r0 == 0:
                torch.mm(logits.t(), x, out=d_weight)
            else:
                d_weight.addmm_(logits.t(), x)
        if bias_grad:
            d_bias += logits.sum(0, dtype=torch.float32)
    loss = _reduce(row_loss, valid, reduction, input.dtype)
    return loss, d_input, d_weight, d_bias.to(input.dtype)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (python -m fastgpt.triton.report)
# ---------------------------------------------------------------------------------------------


def _spec(V, dtype, compute_grad, smoothing, row_scale):
    block = _block_v(V)
    signature = {
        "Logits": dtype,
        "Target": "*i64",
        "RowLoss": "*fp32",
        "Grad": dtype,
        "RowScale": dtype,
        "stride_logits_row": "i32",
        "stride_grad_row": "i32",
        "V": "i32",
        "ignore_index": "i64",
        "label_smoothing": "fp32",
        "scale": "fp32",
        "COMPUTE_GRAD": "constexpr",
        "HAS_SMOOTHING": "constexpr",
        "HAS_ROW_SCALE": "constexpr",
        "BLOCK_V": "constexpr",
    }
    constexprs = {
        "COMPUTE_GRAD": compute_grad,
        "HAS_SMOOTHING": smoothing,
        "HAS_ROW_SCALE": row_scale,
        "BLOCK_V": block,
    }
    divisible = [name for name, ty in signature.items() if ty.startswith("*")]
    if V % 16 == 0:
        divisible += ["V", "stride_logits_row", "stride_grad_row"]
    flags = " ".join(
        name
        for name, on in (("grad", compute_grad), ("smoothing", smoothing), ("row_scale", row_scale))
        if on
    )
    return {
        "kernel": _cross_entropy_kernel,
        "signature": signature,
        "constexprs": constexprs,
        "divisible_by_16": divisible,
        "options": {"num_warps": _num_warps(block)},
        "config": f"V={V} {dtype[1:]} {flags or 'loss only'} BLOCK_V={block} w{_num_warps(block)}",
    }


def AOT_SPECS():
    """The CE kernel in the configurations the launchers choose: every flag combination at
    GPT-2's V=50257 in bf16, each dtype with a gradient, and small / aligned row lengths."""
    specs = []
    for grad in (False, True):
        for smoothing in (False, True):
            for row_scale in (False, True):
                specs.append(_spec(50257, "*bf16", grad, smoothing, row_scale))
    for dtype in ("*fp32", "*fp16"):
        specs.append(_spec(50257, dtype, True, False, False))
    for V in (17, 1000, 4096, 32000):
        specs.append(_spec(V, "*bf16", True, False, False))
    return specs
