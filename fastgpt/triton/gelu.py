"""GELU and bias+GELU, forward and backward, over a contiguous tensor viewed as (M, C).

With a bias (C,), C is the input's last dim and the bias is broadcast over the M rows; without
one, the tensor is one flat row (M = 1, C = numel). Both are elementwise:

    forward:   y  = gelu(x + bias)                  x + bias in fp32, never rounded
    backward:  dx = dy * gelu'(x + bias)            recomputed from x and bias, nothing saved
               dbias = sum over rows of dx          (when asked)

GELU is written as y = x * P(x) with P in [0, 1] computed from its tail T = min(P, 1 - P):
  tanh:  T = sigmoid(-2|u|) = z / (1 + z), z = exp(-2|u|), u = sqrt(2/pi) (x + 0.044715 x^3)
         (0.5 (1 + tanh(u)) = sigmoid(2u): the same function as GPT-2's, with no tanh needed)
  erf:   P = 0.5 (1 + erf(x / sqrt(2)))              (tl.math.erf: libdevice on the GPU)
and P = T for x < 0, 1 - T otherwise. Every exp argument is <= 0, so nothing overflows, and the
small negative outputs keep their relative accuracy (no 1 + tanh(u) cancellation).
Derivatives: tanh: P + 2 x T (1 - T) du/dx;  erf: P + x exp(-x^2 / 2) / sqrt(2 pi).

Kernels. One program per tile of BLOCK_M x BLOCK_C elements (~_TILE elements, masked on both
edges); the bias tile is read once per program. The backward's programs each own a column block
and a contiguous range of rows, so dbias accumulates in registers and is written as one row of fp32
partials per program; `sum_rows` (fastgpt/triton/_reduce.py, shared with LayerNorm) adds the
partials column by column in a fixed order: no atomics, deterministic.

Cost per call, with e the element size in bytes: forward ~15*M*C flops, reads and writes M*C*e;
backward ~25*M*C flops, reads 2*M*C*e, writes M*C*e (plus the O(C) bias and partials).
"""

import functools

import torch
import triton
import triton.language as tl

from fastgpt.triton._reduce import POINTER_TYPES, sum_rows

_TILE = 2048  # elements per program: 16 per thread at 4 warps
_NUM_WARPS = 4

# Globals read inside @triton.jit functions must be constexpr.
_BETA = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_KAPPA = tl.constexpr(0.044715)
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _cdf(x, TANH: tl.constexpr):
    """(P(x), T(x)) in fp32; T is only meaningful (and only used) for TANH."""
    if TANH:
        au = tl.abs(x) * (_BETA + (_BETA * _KAPPA) * x * x)
        z = tl.exp(-2.0 * au)
        t = z / (1.0 + z)
        p = tl.where(x < 0.0, t, 1.0 - t)
    else:
        t = x  # unused
        p = 0.5 + 0.5 * tl.math.erf(x * _INV_SQRT2)
    return p, t


@triton.jit
def _gelu_grad(x, TANH: tl.constexpr):
    p, t = _cdf(x, TANH)
    if TANH:
        # Past |x| = 20, t is exactly 0 and so is this term: the clamp keeps x^2 finite there
        # (0 * inf would be nan).
        xc = tl.minimum(tl.maximum(x, -20.0), 20.0)
        du = _BETA + (3.0 * _BETA * _KAPPA) * xc * xc
        return p + 2.0 * xc * t * (1.0 - t) * du
    else:
        return p + x * (tl.exp(-0.5 * x * x) * _INV_SQRT_2PI)


@triton.jit
def _tile(pid, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows, columns, flat offsets and mask of tile `pid` (column blocks vary fastest)."""
    num_col_blocks = tl.cdiv(C, BLOCK_C)
    pid_m = pid // num_col_blocks
    pid_c = pid % num_col_blocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows, cols


@triton.jit
def _gelu_fwd_kernel(
    X,  # (M, C)
    B,  # (C,), read only if HAS_BIAS
    Y,  # (M, C)
    M,
    C,
    HAS_BIAS: tl.constexpr,
    TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # int64: flat offsets pass 2**31 on large activations.
    pid = tl.program_id(0).to(tl.int64)
    rows, cols = _tile(pid, M, C, BLOCK_M, BLOCK_C)
    col_mask = cols < C
    mask = (rows[:, None] < M) & col_mask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    p, t = _cdf(x, TANH)
    tl.store(Y + offs, (x * p).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(
    DY,  # (M, C)
    X,  # (M, C)
    B,  # (C,), read only if HAS_BIAS
    DX,  # (M, C)
    DB_partial,  # (num_row_programs, C) fp32, written only if COMPUTE_DB
    M,
    C,
    rows_per_program,  # a multiple of BLOCK_M
    HAS_BIAS: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    TANH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Program (pid_m, pid_c) walks rows [pid_m * rows_per_program, +rows_per_program) of column
    # block pid_c, BLOCK_M rows at a time, with its share of dbias in registers.
    pid = tl.program_id(0).to(tl.int64)
    num_col_blocks = tl.cdiv(C, BLOCK_C)
    pid_m = pid // num_col_blocks
    pid_c = pid % num_col_blocks
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r in range(row_start, row_end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & col_mask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += b[None, :]
        # Masked lanes have dy = 0, so their dx is 0 and adds nothing to dbias.
        dx = dy * _gelu_grad(x, TANH)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DB:
            db += tl.sum(dx, axis=0)
    if COMPUTE_DB:
        tl.store(DB_partial + pid_m * C + cols, db, mask=col_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _tile_config(C):
    """(BLOCK_M, BLOCK_C): a tile of _TILE elements, as wide as the row allows."""
    block_c = min(triton.next_power_of_2(max(C, 1)), _TILE)
    return _TILE // block_c, block_c


@functools.lru_cache
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, each walking several row blocks


def _view(x, bias):
    """(M, C) of the flat contiguous x: rows of the bias's length, or one flat row."""
    if bias is None:
        return 1, x.numel()
    C = bias.numel()
    return x.numel() // C, C


def _check(approximate):
    if approximate not in ("none", "tanh"):
        raise RuntimeError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def gelu_fwd(x, bias, approximate):
    """gelu(x + bias) of a contiguous x; bias (x.shape[-1],) in x's dtype, or None."""
    _check(approximate)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    M, C = _view(x, bias)
    block_m, block_c = _tile_config(C)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(C, block_c),)
    _gelu_fwd_kernel[grid](
        x,
        bias if bias is not None else x,
        y,
        M,
        C,
        HAS_BIAS=bias is not None,
        TANH=approximate == "tanh",
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=_NUM_WARPS,
    )
    return y


def _bwd_grid(M, C, block_m, block_c, device):
    """(row programs, rows per program): about 8 programs per SM in all, each walking a
    contiguous range of rows; every program adds a row of partials to reduce."""
    col_blocks = triton.cdiv(C, block_c)
    row_blocks = triton.cdiv(M, block_m)
    target = max(1, min(row_blocks, triton.cdiv(_num_sms(device) * 8, col_blocks)))
    rows_per_program = triton.cdiv(row_blocks, target) * block_m
    return triton.cdiv(M, rows_per_program), rows_per_program


def gelu_bwd(dy, x, bias, approximate, bias_grad):
    """(dx, dbias) of gelu(x + bias) given dy; dbias is x.new_empty(0) unless bias_grad.
    Deterministic: no atomics."""
    _check(approximate)
    if bias_grad and bias is None:
        raise RuntimeError("bias_grad needs a bias")
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, (x.new_zeros(bias.numel()) if bias_grad else x.new_empty(0))
    M, C = _view(x, bias)
    block_m, block_c = _tile_config(C)
    if bias_grad:
        num_row_programs, rows_per_program = _bwd_grid(M, C, block_m, block_c, x.device)
        partial = torch.empty((num_row_programs, C), dtype=torch.float32, device=x.device)
    else:
        # No reduction: every program is one tile.
        num_row_programs, rows_per_program = triton.cdiv(M, block_m), block_m
        partial = x.new_empty(1, dtype=torch.float32)  # a placeholder, never touched
    grid = (num_row_programs * triton.cdiv(C, block_c),)
    _gelu_bwd_kernel[grid](
        dy,
        x,
        bias if bias is not None else x,
        dx,
        partial,
        M,
        C,
        rows_per_program,
        HAS_BIAS=bias is not None,
        COMPUTE_DB=bias_grad,
        TANH=approximate == "tanh",
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=_NUM_WARPS,
    )
    dbias = sum_rows(partial, x.dtype) if bias_grad else x.new_empty(0)
    return dx, dbias


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (python -m fastgpt.triton.report)
# ---------------------------------------------------------------------------------------------


def _spec(kernel, signature, constexprs, divisible, config):
    return {
        "kernel": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "divisible_by_16": divisible,
        "options": {"num_warps": _NUM_WARPS},
        "config": config + f" w{_NUM_WARPS}",
    }


def _fwd_spec(C, dtype, bias, tanh):
    block_m, block_c = _tile_config(C)
    ptr = POINTER_TYPES[dtype]
    signature = {"X": ptr, "B": ptr, "Y": ptr, "M": "i32", "C": "i32"}
    signature |= dict.fromkeys(("HAS_BIAS", "TANH", "BLOCK_M", "BLOCK_C"), "constexpr")
    constexprs = {"HAS_BIAS": bias, "TANH": tanh, "BLOCK_M": block_m, "BLOCK_C": block_c}
    divisible = ["X", "B", "Y"] + (["C"] if C % 16 == 0 else [])
    approx = "tanh" if tanh else "erf"
    name = f"C={C} {dtype} {approx}{' +bias' if bias else ''} BLOCK={block_m}x{block_c}"
    return _spec(_gelu_fwd_kernel, signature, constexprs, divisible, name)


def _bwd_spec(C, dtype, bias, dbias, tanh):
    block_m, block_c = _tile_config(C)
    ptr = POINTER_TYPES[dtype]
    signature = {"DY": ptr, "X": ptr, "B": ptr, "DX": ptr, "DB_partial": "*fp32"}
    signature |= {"M": "i32", "C": "i32", "rows_per_program": "i32"}
    signature |= dict.fromkeys(
        ("HAS_BIAS", "COMPUTE_DB", "TANH", "BLOCK_M", "BLOCK_C"), "constexpr"
    )
    constexprs = {
        "HAS_BIAS": bias,
        "COMPUTE_DB": dbias,
        "TANH": tanh,
        "BLOCK_M": block_m,
        "BLOCK_C": block_c,
    }
    divisible = ["DY", "X", "B", "DX", "DB_partial"] + (["C"] if C % 16 == 0 else [])
    approx = "tanh" if tanh else "erf"
    flags = (" +bias" if bias else "") + (" +dbias" if dbias else "")
    name = f"C={C} {dtype} {approx}{flags} BLOCK={block_m}x{block_c}"
    return _spec(_gelu_bwd_kernel, signature, constexprs, divisible, name)


def AOT_SPECS():
    """Every kernel in the configurations the launchers choose: both approximations in each
    dtype at GPT-2's MLP width (3072, bias+GELU), the flat no-bias case (one row, the widest
    tile), and narrow or ragged rows (1, 17, 768) that give taller tiles. The dbias reduction is
    fastgpt.triton._reduce's, compiled with that module's specs."""
    specs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for tanh in (False, True):
            specs.append(_fwd_spec(3072, dtype, bias=True, tanh=tanh))
            specs.append(_bwd_spec(3072, dtype, bias=True, dbias=True, tanh=tanh))
            # No bias: one flat row of numel elements (the JIT sees a large, unaligned C).
            specs.append(_fwd_spec(1_000_003, dtype, bias=False, tanh=tanh))
            specs.append(_bwd_spec(1_000_003, dtype, bias=False, dbias=False, tanh=tanh))
    for C in (1, 17, 768):
        for tanh in (False, True):
            specs.append(_fwd_spec(C, "bf16", bias=True, tanh=tanh))
            specs.append(_bwd_spec(C, "bf16", bias=True, dbias=True, tanh=tanh))
    specs.append(_bwd_spec(3072, "bf16", bias=True, dbias=False, tanh=True))
    return specs
