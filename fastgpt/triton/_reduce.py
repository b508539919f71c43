"""The deterministic column sum shared by the Triton backward kernels: dweight/dbias of
LayerNorm, dbias of bias+GELU.

Those backwards reduce without atomics: each program owns a contiguous block of rows and writes
one row of fp32 partial sums, and `sum_rows` adds the partials column by column in a fixed order,
so the result is the same bit for bit on every run. Op modules never import each other; they share
this helper instead. Its kernel is compiled by `python -m fastgpt.triton.report` once per
configuration here (AOT_SPECS), not once per module that uses it.
"""

import torch
import triton
import triton.language as tl

# Tile of the reduction: 32 fp32 columns are one 128-byte segment per row, and a narrow column
# block gives even small N enough programs to spread over the SMs.
_SUM_BLOCK_ROWS = 64
_SUM_BLOCK_COLS = 32
_SUM_NUM_WARPS = 4


@triton.jit
def _sum_rows_kernel(
    P,  # (num_rows, N) fp32 partial sums
    Out,  # (N,) column sums, in Out's dtype
    stride_p_row,
    num_rows,
    N,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    # One program per block of columns; it walks down all partial rows in a fixed order, so the
    # result is the same bit for bit on every run.
    pid = tl.program_id(0)
    cols = pid * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for start in range(0, num_rows, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        mask = (rows[:, None] < num_rows) & col_mask[None, :]
        acc += tl.load(P + rows[:, None] * stride_p_row + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(Out + cols, total.to(Out.dtype.element_ty), mask=col_mask)


def sum_rows(partial, dtype):
    """Column sums (N,) in `dtype` of the fp32 partials (num_rows, N), whose columns are
    contiguous; rows are added in a fixed order. Deterministic: no atomics."""
    num_rows, N = partial.shape
    out = torch.empty(N, dtype=dtype, device=partial.device)
    _sum_rows_kernel[(triton.cdiv(N, _SUM_BLOCK_COLS),)](
        partial,
        out,
        partial.stride(0),
        num_rows,
        N,
        BLOCK_ROWS=_SUM_BLOCK_ROWS,
        BLOCK_COLS=_SUM_BLOCK_COLS,
        num_warps=_SUM_NUM_WARPS,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (python -m fastgpt.triton.report)
# ---------------------------------------------------------------------------------------------

# The pointer type of each dtype in a kernel signature; every module's specs use it.
POINTER_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _sum_rows_spec(N, dtype):
    signature = {
        "P": "*fp32",
        "Out": POINTER_TYPES[dtype],
        "stride_p_row": "i32",
        "num_rows": "i32",
        "N": "i32",
        "BLOCK_ROWS": "constexpr",
        "BLOCK_COLS": "constexpr",
    }
    # What the JIT would specialize at run time: torch allocations are 16-byte aligned, and N and
    # the row stride (= N, contiguous partials) are multiples of 16 when N is.
    divisible = ["P", "Out"] + (["stride_p_row", "N"] if N % 16 == 0 else [])
    return {
        "kernel": _sum_rows_kernel,
        "signature": signature,
        "constexprs": {"BLOCK_ROWS": _SUM_BLOCK_ROWS, "BLOCK_COLS": _SUM_BLOCK_COLS},
        "divisible_by_16": divisible,
        "options": {"num_warps": _SUM_NUM_WARPS},
        "config": f"N={N} {dtype} BLOCK={_SUM_BLOCK_ROWS}x{_SUM_BLOCK_COLS} w{_SUM_NUM_WARPS}",
    }


def AOT_SPECS():
    """The reduction in every output dtype its users launch it with (LayerNorm's dweight/dbias
    and GELU's dbias come in x's dtype: bf16, fp16, fp32), for a row length that is a multiple of
    16 (GPT-2's 768, which the JIT specializes as aligned) and one that is not (17)."""
    return [_sum_rows_spec(N, dtype) for dtype in ("bf16", "fp16", "fp32") for N in (768, 17)]
