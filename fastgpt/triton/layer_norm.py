"""LayerNorm (and residual-add + LayerNorm) over the last dim of a contiguous (M, N) tensor.

Forward, per row of N elements:

    mean = sum(x) / N
    rstd = 1 / sqrt(sum((x - mean)**2) / N + eps)         # biased variance, eps inside the sqrt
    y    = (x - mean) * rstd * weight + bias

With a residual, the row is first `s = x + residual`, rounded to x's dtype and written out, and
the LayerNorm runs on that rounded `s`: exactly eager `s = x + r; layer_norm(s)`.

Backward, with xhat = (x - mean) * rstd and g = dy * weight:

    dx      = rstd * (g - xhat * mean(g * xhat) - mean(g))   (+ dresidual)
    dweight = sum over rows of dy * xhat
    dbias   = sum over rows of dy

Statistics and arithmetic are fp32 whatever the input dtype; each output is rounded once on store.

Kernels. A row of up to MAX_BLOCK_N elements is held whole in registers by one program, so every
tensor is read once and written once (`_layer_norm_fwd_kernel`, `_layer_norm_bwd_kernel`).
Longer rows go to the `*_wide` kernels, which loop over the row in chunks of MAX_BLOCK_N // 4
and re-read it (from L2, mostly). dweight and dbias are reduced without atomics, so the backward
is deterministic: each backward program owns a contiguous block of rows and writes one row of
fp32 partial sums, and `sum_rows` (fastgpt/triton/_reduce.py, shared with GELU) adds the
partials column by column in a fixed order.

Cost per call (see `layer_norm_fwd_cost` / `layer_norm_bwd_cost`, used by the benchmarks to report
TFLOP/s and GB/s), with e the element size in bytes:

    forward:  ~8*M*N flops; reads M*N*e (+ M*N*e residual), writes M*N*e (+ M*N*e summed)
    backward: ~14*M*N flops; reads 2*M*N*e (x, dy) (+ M*N*e dresidual), writes M*N*e (dx)

plus the O(N) parameters and the O(M) fp32 statistics. The fp32 partials of the dweight/dbias
reduction are an implementation cost and are not counted.
"""

import functools

import torch
import triton
import triton.language as tl

from fastgpt.triton._reduce import POINTER_TYPES, sum_rows

# Largest row a program keeps whole in registers. Beyond it the register file would spill (the
# backward holds x, dy, weight and two fp32 accumulators per element), so longer rows use the wide
# kernels, which loop over chunks of a quarter of this size.
MAX_BLOCK_N = 8192


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # input (M, N)
    R,  # residual (M, N), read only if HAS_RESIDUAL
    W,  # weight (N,), read only if HAS_WEIGHT
    B,  # bias (N,), read only if HAS_BIAS
    Y,  # output (M, N)
    S,  # x + residual (M, N), written only if HAS_RESIDUAL
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    stride_x_row,
    stride_r_row,
    stride_y_row,
    stride_s_row,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next power of two >= N: the whole row is one block
):
    # One program per row. int64 because row * stride passes 2**31 on large activations.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N

    # Masked lanes read 0, so they add nothing to the sums below.
    x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r_row + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the input dtype *before* normalizing, so the LayerNorm sees exactly
        # the tensor returned as `summed` (what eager `s = x + r; layer_norm(s)` computes).
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + row * stride_s_row + cols, s, mask=mask)
        x = s.to(tl.float32)

    mean = tl.sum(x, axis=0) / N
    # Variance from the centred values, both passes over registers: E[x^2] - E[x]^2 would cancel
    # catastrophically when |mean| >> std. The masked lanes must be zeroed again (0 - mean != 0).
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / N
    rstd = 1.0 / tl.sqrt_rn(var + eps)  # IEEE sqrt: the statistic the backward reuses
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)

    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_fwd_wide_kernel(
    X,
    R,
    W,
    B,
    Y,
    S,
    Mean,
    Rstd,
    stride_x_row,
    stride_r_row,
    stride_y_row,
    stride_s_row,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # chunk size; N > BLOCK_N
):
    # Same contract as _layer_norm_fwd_kernel for rows too long for registers: three passes over
    # the row in BLOCK_N chunks (mean, variance, normalize). The row is re-read by the later
    # passes; one row of a program is at most a few hundred KB, so those reads mostly hit L2.
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x_row

    # Pass 1: the mean. With a residual, also form, round and store the sum.
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r_row + cols, mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(S.dtype.element_ty)
            tl.store(S + row * stride_s_row + cols, s, mask=mask)
            x = s.to(tl.float32)
        acc += x
    mean = tl.sum(acc, axis=0) / N
    if HAS_RESIDUAL:
        # The later passes read the rounded sum back. The barrier makes this program's stores
        # visible to all of its threads (a chunk element may be loaded by another thread).
        tl.debug_barrier()
        x_row = S + row * stride_s_row

    # Pass 2: the variance of the centred values.
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, x - mean, 0.0)
        acc += xc * xc
    var = tl.sum(acc, axis=0) / N
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)

    # Pass 3: normalize, scale, shift.
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # upstream gradient (M, N)
    X,  # LayerNorm input (M, N)
    W,  # weight (N,), read only if HAS_WEIGHT
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    DRes,  # gradient flowing into the residual branch (M, N), read only if HAS_DRESIDUAL
    DX,  # output (M, N)
    DW_partial,  # (num_programs, N) fp32, written only if COMPUTE_DW
    DB_partial,  # (num_programs, N) fp32, written only if COMPUTE_DB
    stride_dy_row,
    stride_x_row,
    stride_dres_row,
    stride_dx_row,
    M,
    N,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_DRESIDUAL: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next power of two >= N: the whole row is one block
):
    # Each program walks a contiguous block of rows, computing dx row by row while it
    # accumulates its share of dweight and dbias in registers; one store of partials at the end.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)

    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * w if HAS_WEIGHT else dy
        # The two row means of the LayerNorm Jacobian-vector product (see the module docstring).
        c1 = tl.sum(xhat * g, axis=0) / N
        c2 = tl.sum(g, axis=0) / N
        dx = (g - (xhat * c1 + c2)) * rstd
        if HAS_DRESIDUAL:
            # Added in fp32 so the gradient of x + residual is rounded once.
            dx += tl.load(DRes + row * stride_dres_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += dy * xhat
        if COMPUTE_DB:
            db += dy

    if COMPUTE_DW:
        tl.store(DW_partial + pid * N + cols, dw, mask=mask)
    if COMPUTE_DB:
        tl.store(DB_partial + pid * N + cols, db, mask=mask)


@triton.jit
def _layer_norm_bwd_wide_kernel(
    DY,
    X,
    W,
    Mean,
    Rstd,
    DRes,
    DX,
    DW_partial,
    DB_partial,
    Coef,  # (M, 2) fp32 scratch: the row means c1, c2 of the first phase
    stride_dy_row,
    stride_x_row,
    stride_dres_row,
    stride_dx_row,
    M,
    N,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_DRESIDUAL: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,  # chunk size; N > BLOCK_N
):
    # Same contract as _layer_norm_bwd_kernel for rows too long for registers. dx needs two
    # means over the whole row before any element of it is known, so it takes two phases:
    #   1. per row, loop over chunks for c1 = mean(xhat * g) and c2 = mean(g), kept in Coef;
    #   2. per chunk of columns, loop over this program's rows for dx, with the dweight/dbias
    #      partials of that chunk accumulating in registers (never read-modify-written in
    #      global memory).
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)

    # Phase 1: the row coefficients.
    for row in range(row_start, row_end):
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        acc_c1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_c2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            if HAS_WEIGHT:
                dy = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            acc_c1 += xhat * dy
            acc_c2 += dy
        tl.store(Coef + 2 * row, tl.sum(acc_c1, axis=0) / N)
        tl.store(Coef + 2 * row + 1, tl.sum(acc_c2, axis=0) / N)
    # Phase 2 reads Coef back, possibly from other threads of this program.
    tl.debug_barrier()

    # Phase 2: dx, and the dweight/dbias partials, one chunk of columns at a time.
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            c1 = tl.load(Coef + 2 * row)
            c2 = tl.load(Coef + 2 * row + 1)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * w if HAS_WEIGHT else dy
            dx = (g - (xhat * c1 + c2)) * rstd
            if HAS_DRESIDUAL:
                dres = tl.load(DRes + row * stride_dres_row + cols, mask=mask, other=0.0)
                dx += dres.to(tl.float32)
            tl.store(DX + row * stride_dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw += dy * xhat
            if COMPUTE_DB:
                db += dy
        if COMPUTE_DW:
            tl.store(DW_partial + pid * N + cols, dw, mask=mask)
        if COMPUTE_DB:
            tl.store(DB_partial + pid * N + cols, db, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _row_config(N):
    """(BLOCK_N, num_warps, wide) for rows of N elements.

    As in Triton's LayerNorm tutorial, one warp per 256 elements of the block (8 per thread), but
    up to 16 warps rather than 8: with 8 warps the backward of an 8192-wide block holds 32
    elements per thread in ~250 registers (8 resident warps per SM); with 16, ~100 registers.
    `python -m fastgpt.triton.report` shows the registers and spills of every choice made here.
    """
    wide = N > MAX_BLOCK_N
    # The wide kernels loop anyway, and keep more live state per element (the addresses and
    # accumulators of nested loops): quarter-size chunks keep their backward from spilling.
    block_n = MAX_BLOCK_N // 4 if wide else triton.next_power_of_2(N)
    num_warps = min(max(block_n // 256, 1), 16)
    return block_n, num_warps, wide


@functools.lru_cache
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter (CPU tensors): a few programs, so that several of them each walk
    # several rows, as they do on a GPU.
    return 4


def _bwd_grid(M, N, num_warps, device):
    """(num_programs, rows_per_program) of the backward.

    Enough programs for ~16 resident warps per SM to hide memory latency, but no more: each
    program adds a row of fp32 partials that the final reduction has to read back.
    """
    target = min(M, _num_sms(device) * max(1, 16 // num_warps))
    rows_per_program = triton.cdiv(M, target)
    return triton.cdiv(M, rows_per_program), rows_per_program


def _launch_fwd(x, residual, weight, bias, eps):
    M, N = x.shape
    y = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else None
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return y, summed, mean, rstd

    block_n, num_warps, wide = _row_config(N)
    kernel = _layer_norm_fwd_wide_kernel if wide else _layer_norm_fwd_kernel
    # An absent tensor is replaced by x: its loads and stores are compiled out by the constexpr
    # flag, and a placeholder of x's dtype keeps one specialization per flag combination.
    r = residual if residual is not None else x
    s = summed if summed is not None else x
    kernel[(M,)](
        x,
        r,
        weight if weight is not None else x,
        bias if bias is not None else x,
        y,
        s,
        mean,
        rstd,
        x.stride(0),
        r.stride(0),
        y.stride(0),
        s.stride(0),
        N,
        eps,
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, summed, mean, rstd


def layer_norm_fwd(x, weight, bias, eps):
    """LayerNorm of the rows of x (M, N). weight, bias: (N,) in x's dtype, or None.

    Returns (y, mean, rstd): y (M, N) in x's dtype; mean, rstd (M,) fp32 for the backward.
    Cost: see `layer_norm_fwd_cost(M, N, x.element_size(), fused_residual=False)`.
    """
    y, _, mean, rstd = _launch_fwd(x, None, weight, bias, eps)
    return y, mean, rstd


def add_layer_norm_fwd(x, residual, weight, bias, eps):
    """Fused `s = x + residual; y = layer_norm(s)`, one pass over memory.

    Returns (y, summed, mean, rstd): summed is x + residual rounded to x's dtype, and y its
    LayerNorm, so they match the eager two-step computation. The backward takes summed as x.
    Cost: see `layer_norm_fwd_cost(M, N, x.element_size(), fused_residual=True)`.
    """
    return _launch_fwd(x, residual, weight, bias, eps)


def layer_norm_bwd(dy, x, mean, rstd, weight, dresidual, weight_grad, bias_grad):
    """Gradients of LayerNorm given dy (M, N) and the forward's x (its input: for add_layer_norm,
    summed), mean and rstd.

    weight: (N,) or None (then gamma = 1). dresidual: (M, N) or None, a gradient reaching x by
    another path (the residual stream), added to dx before its single rounding.
    Returns (dx, dweight, dbias): dx (M, N) in x's dtype; dweight, dbias (N,) in x's dtype, or
    x.new_empty(0) where weight_grad / bias_grad is False. Deterministic: no atomics.
    Cost: see `layer_norm_bwd_cost(M, N, x.element_size(), dresidual is not None)`.
    """
    M, N = x.shape
    dx = torch.empty_like(x)
    if M == 0:
        # A sum over no rows is zero.
        dweight = x.new_zeros(N) if weight_grad else x.new_empty(0)
        dbias = x.new_zeros(N) if bias_grad else x.new_empty(0)
        return dx, dweight, dbias

    block_n, num_warps, wide = _row_config(N)
    num_programs, rows_per_program = _bwd_grid(M, N, num_warps, x.device)

    def partials(needed):
        # Every program writes its whole row of partials: no zeroing needed. When the gradient
        # is not, `mean` stands in as an fp32 placeholder the kernel never touches.
        if not needed:
            return mean
        return torch.empty((num_programs, N), dtype=torch.float32, device=x.device)

    dw_partial, db_partial = partials(weight_grad), partials(bias_grad)
    dres = dresidual if dresidual is not None else x

    pointers = [
        dy,
        x,
        weight if weight is not None else x,
        mean,
        rstd,
        dres,
        dx,
        dw_partial,
        db_partial,
    ]
    kernel = _layer_norm_bwd_kernel
    if wide:
        kernel = _layer_norm_bwd_wide_kernel
        pointers.append(torch.empty((M, 2), dtype=torch.float32, device=x.device))
    kernel[(num_programs,)](
        *pointers,
        dy.stride(0),
        x.stride(0),
        dres.stride(0),
        dx.stride(0),
        M,
        N,
        rows_per_program,
        HAS_WEIGHT=weight is not None,
        HAS_DRESIDUAL=dresidual is not None,
        COMPUTE_DW=weight_grad,
        COMPUTE_DB=bias_grad,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    dweight = sum_rows(dw_partial, x.dtype) if weight_grad else x.new_empty(0)
    dbias = sum_rows(db_partial, x.dtype) if bias_grad else x.new_empty(0)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# Cost model, for benchmarks (TFLOP/s, GB/s)
# ---------------------------------------------------------------------------------------------


def layer_norm_fwd_cost(M, N, elt_bytes, fused_residual, has_weight=True, has_bias=True):
    """(flops, bytes) of one forward call: the minimal DRAM traffic, not what caches save.

    Flops per element: mean (1 add), centre (1 sub), variance (1 mul + 1 add), scale by rstd
    (1 mul), weight (1 mul), bias (1 add), residual (1 add): 8 with everything.
    Bytes: x (+ residual) read and y (+ summed) written, M*N*elt_bytes each; weight and bias read
    once; mean and rstd written in fp32.
    """
    flops = (5 + has_weight + has_bias + fused_residual) * M * N
    row_tensors = 2 + 2 * fused_residual
    nbytes = row_tensors * M * N * elt_bytes + (has_weight + has_bias) * N * elt_bytes + 2 * 4 * M
    return flops, nbytes


def layer_norm_bwd_cost(
    M, N, elt_bytes, fused_residual, has_weight=True, weight_grad=True, bias_grad=True
):
    """(flops, bytes) of one backward call; fused_residual means a dresidual is added.

    Flops per element: xhat (2), c1 and c2 sums (3), dx = (g - (xhat*c1 + c2)) * rstd (4),
    g = dy * weight (1), dresidual (1), dweight (2), dbias (1): 14 with everything.
    Bytes: dy and x read, dx written (+ dresidual read), M*N*elt_bytes each; mean and rstd read
    in fp32; weight read, dweight and dbias written once.
    """
    flops = (9 + has_weight + fused_residual + 2 * weight_grad + bias_grad) * M * N
    row_tensors = 3 + fused_residual
    vectors = has_weight + weight_grad + bias_grad
    nbytes = row_tensors * M * N * elt_bytes + vectors * N * elt_bytes + 2 * 4 * M
    return flops, nbytes


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (python -m fastgpt.triton.report)
# ---------------------------------------------------------------------------------------------


def _flags_name(**flags):
    return "+".join(name for name, on in flags.items() if on) or "plain"


def _fwd_spec(N, dtype, residual, weight, bias):
    block_n, num_warps, wide = _row_config(N)
    kernel = _layer_norm_fwd_wide_kernel if wide else _layer_norm_fwd_kernel
    ptr = POINTER_TYPES[dtype]
    signature = {
        "X": ptr,
        "R": ptr,
        "W": ptr,
        "B": ptr,
        "Y": ptr,
        "S": ptr,
        "Mean": "*fp32",
        "Rstd": "*fp32",
        "stride_x_row": "i32",
        "stride_r_row": "i32",
        "stride_y_row": "i32",
        "stride_s_row": "i32",
        "N": "i32",
        "eps": "fp32",
        "HAS_RESIDUAL": "constexpr",
        "HAS_WEIGHT": "constexpr",
        "HAS_BIAS": "constexpr",
        "BLOCK_N": "constexpr",
    }
    constexprs = {
        "HAS_RESIDUAL": residual,
        "HAS_WEIGHT": weight,
        "HAS_BIAS": bias,
        "BLOCK_N": block_n,
    }
    flags = _flags_name(residual=residual, weight=weight, bias=bias)
    return _spec(kernel, signature, constexprs, num_warps, N, f"N={N} {dtype} {flags}")


def _bwd_spec(N, dtype, weight, dresidual, dweight, dbias):
    block_n, num_warps, wide = _row_config(N)
    kernel = _layer_norm_bwd_wide_kernel if wide else _layer_norm_bwd_kernel
    ptr = POINTER_TYPES[dtype]
    signature = {
        "DY": ptr,
        "X": ptr,
        "W": ptr,
        "Mean": "*fp32",
        "Rstd": "*fp32",
        "DRes": ptr,
        "DX": ptr,
        "DW_partial": "*fp32",
        "DB_partial": "*fp32",
    }
    if wide:
        signature["Coef"] = "*fp32"
    signature |= {
        "stride_dy_row": "i32",
        "stride_x_row": "i32",
        "stride_dres_row": "i32",
        "stride_dx_row": "i32",
        "M": "i32",
        "N": "i32",
        "rows_per_program": "i32",
        "HAS_WEIGHT": "constexpr",
        "HAS_DRESIDUAL": "constexpr",
        "COMPUTE_DW": "constexpr",
        "COMPUTE_DB": "constexpr",
        "BLOCK_N": "constexpr",
    }
    constexprs = {
        "HAS_WEIGHT": weight,
        "HAS_DRESIDUAL": dresidual,
        "COMPUTE_DW": dweight,
        "COMPUTE_DB": dbias,
        "BLOCK_N": block_n,
    }
    flags = _flags_name(weight=weight, dresidual=dresidual, dweight=dweight, dbias=dbias)
    return _spec(kernel, signature, constexprs, num_warps, N, f"N={N} {dtype} {flags}")


def _spec(kernel, signature, constexprs, num_warps, N, config):
    # What the JIT would specialize at run time: torch allocations are 16-byte aligned, and N and
    # the row strides (= N, contiguous) are multiples of 16 when N is.
    divisible = [name for name, ty in signature.items() if ty.startswith("*")]
    if N % 16 == 0:
        divisible += [name for name in signature if name == "N" or name.startswith("stride_")]
    config += f" BLOCK_N={constexprs['BLOCK_N']} w{num_warps}"
    return {
        "kernel": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "divisible_by_16": divisible,
        "options": {"num_warps": num_warps},
        "config": config,
    }


def AOT_SPECS():
    """Every kernel of this module in every configuration the launchers choose, for a
    representative set of row lengths: all flag combinations at GPT-2 small's N=768 (in each
    dtype for the common case), the common cases at the other sizes, up to a wide row. The
    dweight/dbias reduction is fastgpt.triton._reduce's, compiled with that module's specs."""
    specs = []
    for dtype in ("bf16", "fp16", "fp32"):
        specs.append(_fwd_spec(768, dtype, residual=False, weight=True, bias=True))
        specs.append(_bwd_spec(768, dtype, weight=True, dresidual=False, dweight=True, dbias=True))
    for residual in (False, True):
        for weight in (False, True):
            for bias in (False, True):
                if (residual, weight, bias) != (False, True, True):
                    specs.append(_fwd_spec(768, "bf16", residual, weight, bias))
    for weight in (False, True):
        for dresidual in (False, True):
            for dweight in (False, True):
                for dbias in (False, True):
                    if (weight, dresidual, dweight, dbias) != (True, False, True, True):
                        specs.append(_bwd_spec(768, "bf16", weight, dresidual, dweight, dbias))
    # 1 and 17: one warp, a masked tail; 1600: GPT-2 XL; 8192: the largest row kept in registers;
    # 16384 and 50257: the wide kernels, aligned and not.
    for N in (1, 17, 1024, 1600, 4096, 8192, 16384, 50257):
        for residual in (False, True):
            specs.append(_fwd_spec(N, "bf16", residual, weight=True, bias=True))
            specs.append(_bwd_spec(N, "bf16", True, residual, dweight=True, dbias=True))
    return specs
