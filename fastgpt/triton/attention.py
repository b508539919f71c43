"""Scaled dot-product attention, FlashAttention-2 style, over contiguous (B, H, T, D) tensors.

Forward, per (batch·head) and query row i, with S = Q·Kᵀ·scale:

    P_ij  = exp(S_ij - lse_i),  lse_i = log(sum_j exp(S_ij))   (over the keys row i may see)
    O_i   = sum_j P_ij · Z_ij · V_j,   Z_ij = keep_ij / (1 - p)  (dropout; Z = 1 without it)

Causal masking is bottom-right aligned, as flash-attention does: query i sees key j when
j <= i + Tk - Tq (see `fastgpt.reference.causal_mask`). A row that sees no key (causal with
Tq > Tk) gets O = 0 and lse = -inf.

Backward, with Δ_i = rowsum(dO ∘ O)_i (= rowsum(P ∘ Z ∘ dO·Vᵀ)_i):

    dV = (P∘Z)ᵀ·dO,   dP = (dO·Vᵀ)∘Z,   dS = P∘(dP - Δ),   dQ = scale·dS·K,   dK = scale·dSᵀ·Q

Kernels (each program owns a block of rows; no atomics anywhere, so every result is bit-for-bit
reproducible):

- `_attn_fwd_kernel`: one program per (query block, b·h). Online softmax in fp32 in base 2, the
  scale folded into one multiply by scale·log2(e). Key blocks above the causal diagonal are never
  visited; the key loop is split into an unmasked part (blocks every row of the query block sees
  whole) and a masked part (the diagonal and the ragged key tail), so masks cost nothing in the
  bulk of the loop. Saves lse (natural log, fp32) for the backward.
- `_attn_bwd_preprocess_kernel`: Δ = rowsum(dO∘O) in fp32.
- `_attn_bwd_dkdv_kernel`: one program per (key block, b·h); walks the query blocks that see it
  (masked on the diagonal and the query tail), accumulating dK and dV in fp32 registers.
- `_attn_bwd_dq_kernel`: one program per (query block, b·h), the forward's loop structure,
  accumulating dQ.
- `_attn_decode_kernel` + `_attn_decode_combine_kernel`: for short queries (Tq <= 16) against a
  long K/V, where one program per (query block, b·h) would leave most SMs idle. The keys are split
  across programs (split-K); each writes a partial (O, lse) in fp32, and the combine kernel merges
  the splits of each row in a fixed order:
O = sum_s exp(lse_s - lse)·O_s, lse = log sum_s exp(lse_s).

Dropout draws `tl.rand(seed, offset + (bh·Tq + i)·Tk + j)` (Philox, counter-based) for element
(bh, i, j) and drops where it is < p. The backward regenerates the same mask from (seed, offset):
nothing is stored, and the same seed gives the same output. `dropout_mask(...)` materialises the
keep mask for tests.

Numerics: Q·Kᵀ and P·V run on tensor cores in the input dtype (P rounded to it) with fp32
accumulation; fp32 inputs use IEEE fp32 dots (no TF32), so the fp32 path matches an fp32
reference to ~1e-6. Outputs are rounded once on store.

GPU launch configuration: every kernel but the preprocess/combine is autotuned over a small set of
H100-sized configs keyed on (Tq, Tk bucketed to powers of two, D, causal, dropout, dtype), with
`triton.heuristics` deriving BLOCK_D = next_pow2(D) (D is padded with masks). Under the
interpreter (TRITON_INTERPRET=1) autotune would run every config, so a single fixed config is used
instead: `_INTERPRET` below selects that path, and the GPU path is the one `AOT_SPECS` compiles.

Cost (see `attention_fwd_cost` / `attention_bwd_cost`), with nq = B·H·Tq, nk = B·H·Tk, a = the
fraction of (i, j) pairs visible (1, or ~1/2 causal) and e the element size:

    forward:  4·a·B·H·Tq·Tk·D flops (two matmuls); reads (nq + 2·nk)·D·e, writes nq·D·e + 4·nq
    backward: 10·a·B·H·Tq·Tk·D flops, the algorithm's five matmuls (S, dV, dP, dQ, dK) as
              flash-attention counts them; the kernels execute seven (S and dP are recomputed
              by both the dK/dV and the dQ kernel, the price of no atomics), 14·a·B·H·Tq·Tk·D.
              Reads (3·nq + 2·nk)·D·e + 8·nq (q, out, dout, k, v; lse and Δ), writes
              (nq + 2·nk)·D·e
"""

import functools
import os

import torch
import triton
import triton.language as tl

from fastgpt.triton._reduce import POINTER_TYPES

# The interpreter's single-config path (see the module docstring). Read once at import: kernels
# are interpreter objects exactly when this was set as triton decorated them.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634

# Short queries against at least this many keys go to the split-K decode kernels.
DECODE_MAX_TQ = 16
DECODE_MIN_TK = 512
_DECODE_BLOCK_M = 16  # the smallest dot tile; holds every query row of a decode call
_DECODE_BLOCK_N = 64  # keys per inner iteration of a decode program; splits are multiples of it

_PRE_BLOCK_M = 64  # rows per program of the Δ preprocess
_PRE_NUM_WARPS = 4
_MASK_BLOCK = 32  # tile of the test-only dropout-mask kernel


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(
    ptr, rows, offs_d, n_rows, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr, PAD_D: tl.constexpr
):
    # A [len(rows), BLOCK_D] tile of a row-major (n_rows, HEAD_DIM) matrix. Masks are emitted
    # only where needed: rows past n_rows (ragged tails) and the padding of D to a power of two.
    ptrs = ptr + rows[:, None] * HEAD_DIM + offs_d[None, :]
    if CHECK_ROWS:
        if PAD_D:
            mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
        else:
            mask = rows[:, None] < n_rows
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        if PAD_D:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _store_rows(ptr, value, rows, offs_d, n_rows, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr):
    ptrs = ptr + rows[:, None] * HEAD_DIM + offs_d[None, :]
    if PAD_D:
        mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    else:
        mask = rows[:, None] < n_rows
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=mask)


# The interpreter multiplies bf16 tiles as their raw uint16 bits (np.matmul on the storage type,
# triton/runtime/interpreter.py create_dot), so under it bf16 dot operands are widened to fp32
# first. That is exact: bf16 products are exact in fp32, which is what the tensor cores do too.
_WIDEN_BF16_DOTS = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    if _WIDEN_BF16_DOTS and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _dropout_keep(seed, offset, bh, rows, cols, Tq, Tk, dropout_p):
    # Keep-mask of dropout for the elements (bh, rows, cols) of the (B·H, Tq, Tk) score space;
    # rows and cols arrive already broadcastable ([M, 1] and [1, N], or transposed). int64
    # counters: B·H·Tq·Tk passes 2**31 at long sequences.
    idx = offset + (bh * Tq + rows.to(tl.int64)) * Tk + cols
    return tl.rand(seed, idx) >= dropout_p


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K_bh,
    V_bh,
    offs_m,
    offs_d,
    start,
    end,
    Tq,
    Tk,
    qk_scale,
    seed,
    offset,
    bh,
    dropout_p,
    drop_scale,
    IS_CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # The online-softmax loop over key blocks [start, end). m_i is the running row max of the
    # scores in log2 units (S·scale·log2 e), l_i the running sum of exp2(s - m_i) (un-dropped:
    # dropout acts after normalisation), acc the running sum of P·Z·V.
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K_bh, offs_n, offs_d, Tk, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        v = _load_rows(V_bh, offs_n, offs_d, Tk, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        s = _dot(q, tl.trans(k), DOT_PRECISION) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < Tk
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; exp2(-inf - -inf) would be NaN.
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new) if MASKED else m_new
        p = tl.math.exp2(s - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep_d = _dropout_keep(
                seed, offset, bh, offs_m[:, None], offs_n[None, :], Tq, Tk, dropout_p
            )
            p = tl.where(keep_d, p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Cost: 4·D flops per visible (i, j) pair (S = Q·Kᵀ and P·V); reads Q once and K, V once per
# query block (from L2 after the first), writes O and lse once. attention_fwd_cost().
@triton.jit
def _attn_fwd_kernel(
    Q,  # (B·H, Tq, HEAD_DIM)
    K,  # (B·H, Tk, HEAD_DIM)
    V,  # (B·H, Tk, HEAD_DIM)
    Out,  # (B·H, Tq, HEAD_DIM), Q's dtype
    Lse,  # (B·H, Tq) fp32, natural log
    qk_scale,  # scale · log2(e)
    Tq,
    Tk,
    seed,
    offset,
    dropout_p,
    TQ_BUCKET,  # next_pow2(Tq), next_pow2(Tk): autotune keys only, unused by the kernel
    TK_BUCKET,
    HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), else "tf32" (unused)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next_pow2(HEAD_DIM), from the heuristic
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = bh * Tq * HEAD_DIM
    kv_base = bh * Tk * HEAD_DIM
    q = _load_rows(Q + q_base, offs_m, offs_d, Tq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)

    m0 = start_m * BLOCK_M
    if IS_CAUSAL:
        # Keys [0, m0 + Tk - Tq + 1) are visible to every row of the block; the last real row
        # sees up to key min(m0 + BLOCK_M, Tq) - 1 + Tk - Tq; blocks beyond are skipped.
        full = tl.minimum(tl.maximum(m0 + Tk - Tq + 1, 0), Tk)
        hi = tl.minimum(tl.maximum(tl.minimum(m0 + BLOCK_M, Tq) + Tk - Tq, 0), Tk)
    else:
        full = Tk
        hi = Tk
    full = (full // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    drop_scale = 1.0 / (1.0 - dropout_p)
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K + kv_base,
        V + kv_base,
        offs_m,
        offs_d,
        0,
        full,
        Tq,
        Tk,
        qk_scale,
        seed,
        offset,
        bh,
        dropout_p,
        drop_scale,
        IS_CAUSAL,
        False,
        HAS_DROPOUT,
        HEAD_DIM,
        BLOCK_N,
        BLOCK_D,
        DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K + kv_base,
        V + kv_base,
        offs_m,
        offs_d,
        full,
        hi,
        Tq,
        Tk,
        qk_scale,
        seed,
        offset,
        bh,
        dropout_p,
        drop_scale,
        IS_CAUSAL,
        True,
        HAS_DROPOUT,
        HEAD_DIM,
        BLOCK_N,
        BLOCK_D,
        DOT_PRECISION,
    )

    # Rows that saw no key (l = 0) give O = 0 and lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    _store_rows(Out + q_base, out, offs_m, offs_d, Tq, HEAD_DIM, BLOCK_D != HEAD_DIM)
    tl.store(Lse + bh * Tq + offs_m, lse, mask=offs_m < Tq)


# ---------------------------------------------------------------------------------------------
# Decode: split-K forward for short queries
# ---------------------------------------------------------------------------------------------


# Cost: as the forward (4·D flops per visible pair), K and V read exactly once overall (each
# split reads its own keys); writes splits·Tq·(D + 1) fp32 partials per b·h.
@triton.jit
def _attn_decode_kernel(
    Q,
    K,
    V,
    PartOut,  # (B·H, num_splits, Tq, HEAD_DIM) fp32, normalised within the split
    PartLse,  # (B·H, num_splits, Tq) fp32, natural log; -inf where the split shows a row nothing
    qk_scale,
    Tq,
    Tk,
    seed,
    offset,
    dropout_p,
    keys_per_split,  # a multiple of BLOCK_N
    TK_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= Tq: every query row is in the one block
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    split = tl.program_id(0)
    num_splits = tl.num_programs(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_base = bh * Tk * HEAD_DIM
    q = _load_rows(Q + bh * Tq * HEAD_DIM, offs_m, offs_d, Tq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)

    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Tk)
    # The same unmasked / masked split as the forward, within [lo, hi): keys visible to query 0
    # (the first real row) need no mask.
    full = tl.minimum(tl.maximum(Tk - Tq + 1, lo), hi) if IS_CAUSAL else hi
    full = lo + ((full - lo) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    drop_scale = 1.0 / (1.0 - dropout_p)
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K + kv_base,
        V + kv_base,
        offs_m,
        offs_d,
        lo,
        full,
        Tq,
        Tk,
        qk_scale,
        seed,
        offset,
        bh,
        dropout_p,
        drop_scale,
        IS_CAUSAL,
        False,
        HAS_DROPOUT,
        HEAD_DIM,
        BLOCK_N,
        BLOCK_D,
        DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K + kv_base,
        V + kv_base,
        offs_m,
        offs_d,
        full,
        hi,
        Tq,
        Tk,
        qk_scale,
        seed,
        offset,
        bh,
        dropout_p,
        drop_scale,
        IS_CAUSAL,
        True,
        HAS_DROPOUT,
        HEAD_DIM,
        BLOCK_N,
        BLOCK_D,
        DOT_PRECISION,
    )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    part = bh * num_splits + split
    _store_rows(
        PartOut + part * Tq * HEAD_DIM, out, offs_m, offs_d, Tq, HEAD_DIM, BLOCK_D != HEAD_DIM
    )
    tl.store(PartLse + part * Tq + offs_m, lse, mask=offs_m < Tq)


# Cost: ~3·splits·D flops per row; reads splits·(D + 1) fp32, writes D elements + one fp32.
@triton.jit
def _attn_decode_combine_kernel(
    PartOut,  # (B·H, num_splits, Tq, HEAD_DIM) fp32
    PartLse,  # (B·H, num_splits, Tq) fp32
    Out,  # (B·H, Tq, HEAD_DIM)
    Lse,  # (B·H, Tq) fp32
    Tq,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next_pow2(num_splits)
    BLOCK_D: tl.constexpr,
):
    # One program per (b·h, query row): a fixed-order merge of that row's splits.
    row = tl.program_id(0).to(tl.int64)  # b·h·Tq + i
    bh = row // Tq
    i = row % Tq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    part_rows = (bh * num_splits + offs_s) * Tq + i
    lse_s = tl.load(PartLse + part_rows, mask=s_mask, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2((lse_s - m_safe) * 1.4426950408889634)  # 0 for empty splits
    total = tl.sum(w, 0)
    o_s = tl.load(
        PartOut + part_rows[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(o_s * w[:, None], 0) / total_safe
    lse = tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total_safe))
    tl.store(Out + row * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(Lse + row, lse)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


# Cost: 2·D flops per row; reads O and dO (2·D elements), writes Δ (one fp32).
@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,  # (rows, HEAD_DIM)
    DOut,  # (rows, HEAD_DIM)
    Delta,  # (rows,) fp32
    n_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out, rows, offs_d, n_rows, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    do = _load_rows(DOut, rows, offs_d, n_rows, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + rows, delta, mask=rows < n_rows)


@triton.jit
def _bwd_tile(
    a,
    b,
    c,
    d,
    lse2,
    q_idx,
    k_idx,
    Tq,
    Tk,
    qk_scale,
    seed,
    offset,
    bh,
    dropout_p,
    drop_scale,
    IS_CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    MASK_Q: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # The tile both backward kernels recompute: S = a·bᵀ, P = exp(S - lse), dP = c·dᵀ, returned
    # as (P, P with dropout applied (for dV), dP with dropout applied); dS = P·(dP - Δ) is left
    # to the caller, which orders it around its own products. The dQ kernel passes (q, k, do, v)
    # and query-major indices ([M, 1] and [1, N]); the dK/dV kernel passes (k, q, v, do) and the
    # transpose. lse2 (lse·log2 e) arrives broadcast like q_idx. MASK_Q: zero the query rows past
    # Tq too (dK/dV sums over them; dQ never stores them).
    s = _dot(a, tl.trans(b), DOT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse2)
    if MASKED:
        # where, not a multiply: a row that sees nothing has lse = -inf and p = inf there.
        keep = k_idx < Tk
        if MASK_Q:
            keep = (q_idx < Tq) & keep
        if IS_CAUSAL:
            keep = keep & (k_idx <= q_idx + (Tk - Tq))
        p = tl.where(keep, p, 0.0)
    dp = _dot(c, tl.trans(d), DOT_PRECISION)
    if HAS_DROPOUT:
        keep_d = _dropout_keep(seed, offset, bh, q_idx, k_idx, Tq, Tk, dropout_p)
        pz = tl.where(keep_d, p * drop_scale, 0.0)
        dp = tl.where(keep_d, dp * drop_scale, 0.0)
    else:
        pz = p
    return p, pz, dp


@triton.jit
def _bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    Q_bh,
    DO_bh,
    Lse_bh,
    Delta_bh,
    offs_n,
    offs_d,
    start,
    end,
    Tq,
    Tk,
    qk_scale,
    seed,
    offset,
    bh,
    dropout_p,
    drop_scale,
    IS_CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Transposed tiles ([BLOCK_N, BLOCK_M]: keys down, queries across), so that dK and dV are
    # plain products with the query-side tiles.
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q_bh, offs_m, offs_d, Tq, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        do = _load_rows(DO_bh, offs_m, offs_d, Tq, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        if MASKED:
            lse = tl.load(Lse_bh + offs_m, mask=offs_m < Tq, other=0.0)
            delta = tl.load(Delta_bh + offs_m, mask=offs_m < Tq, other=0.0)
        else:
            lse = tl.load(Lse_bh + offs_m)
            delta = tl.load(Delta_bh + offs_m)
        p_t, pz_t, dp_t = _bwd_tile(
            k,
            q,
            v,
            do,
            lse[None, :] * 1.4426950408889634,
            offs_m[None, :],
            offs_n[:, None],
            Tq,
            Tk,
            qk_scale,
            seed,
            offset,
            bh,
            dropout_p,
            drop_scale,
            IS_CAUSAL,
            MASKED,
            True,
            HAS_DROPOUT,
            DOT_PRECISION,
        )
        dv += _dot(pz_t.to(do.dtype), do, DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION)
    return dk, dv


# Cost: 8·D flops per visible pair (S, dP, dV, dK); reads K, V once, Q, dO, lse, Δ once per
# key block; writes dK, dV once.
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DK,
    DV,
    qk_scale,  # scale · log2(e)
    sm_scale,  # scale
    Tq,
    Tk,
    seed,
    offset,
    dropout_p,
    TQ_BUCKET,
    TK_BUCKET,
    HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # keys owned by the program
    BLOCK_D: tl.constexpr,
):
    start_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = bh * Tq * HEAD_DIM
    kv_base = bh * Tk * HEAD_DIM
    k = _load_rows(K + kv_base, offs_n, offs_d, Tk, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    v = _load_rows(V + kv_base, offs_n, offs_d, Tk, HEAD_DIM, True, BLOCK_D != HEAD_DIM)

    n0 = start_n * BLOCK_N
    if IS_CAUSAL:
        # Query i sees key j when i >= j - (Tk - Tq): start at the block of the first query that
        # sees key n0; rows from n0 + BLOCK_N - 1 - (Tk - Tq) on see the whole key block.
        lo = (tl.maximum(n0 - (Tk - Tq), 0) // BLOCK_M) * BLOCK_M
        diag = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - (Tk - Tq), lo), Tq)
    else:
        lo = 0
        diag = 0
    mid = lo + tl.cdiv(diag - lo, BLOCK_M) * BLOCK_M
    full = mid + (tl.maximum(Tq - mid, 0) // BLOCK_M) * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    drop_scale = 1.0 / (1.0 - dropout_p)
    Q_bh = Q + q_base
    DO_bh = DOut + q_base
    Lse_bh = Lse + bh * Tq
    Delta_bh = Delta + bh * Tq
    # Diagonal blocks (masked), whole blocks (unmasked), the query tail (masked). Key-tail rows
    # (offs_n >= Tk) hold zeros of k and v; whatever they accumulate is never stored.
    dk, dv = _bwd_dkdv_inner(
        dk,
        dv,
        k,
        v,
        Q_bh,
        DO_bh,
        Lse_bh,
        Delta_bh,
        offs_n,
        offs_d,
        lo,
        mid,
        Tq,
        Tk,
        qk_scale,
        seed,
        offset,
        bh,
        dropout_p,
        drop_scale,
        IS_CAUSAL,
        True,
        HAS_DROPOUT,
        HEAD_DIM,
        BLOCK_M,
        BLOCK_D,
        DOT_PRECISION,
    )
    dk, dv = _bwd_dkdv_inner(
        dk,
        dv,
        k,
        v,
        Q_bh,
        DO_bh,
        Lse_bh,
        Delta_bh,
        offs_n,
        offs_d,
        mid,
        full,
        Tq,
        Tk,
        qk_scale,
        seed,
        offset,
        bh,
        dropout_p,
        drop_scale,
        IS_CAUSAL,
        False,
        HAS_DROPOUT,
        HEAD_DIM,
        BLOCK_M,
        BLOCK_D,
        DOT_PRECISION,
    )
    dk, dv = _bwd_dkdv_inner(
        dk,
        dv,
        k,
        v,
        Q_bh,
        DO_bh,
        Lse_bh,
        Delta_bh,
        offs_n,
        offs_d,
        full,
        Tq,
        Tq,
        Tk,
        qk_scale,
        seed,
        offset,
        bh,
        dropout_p,
        drop_scale,
        IS_CAUSAL,
        True,
        HAS_DROPOUT,
        HEAD_DIM,
        BLOCK_M,
        BLOCK_D,
        DOT_PRECISION,
    )
    _store_rows(DK + kv_base, dk * sm_scale, offs_n, offs_d, Tk, HEAD_DIM, BLOCK_D != HEAD_DIM)
    _store_rows(DV + kv_base, dv, offs_n, offs_d, Tk, HEAD_DIM, BLOCK_D != HEAD_DIM)


@triton.jit
def _bwd_dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    K_bh,
    V_bh,
    offs_m,
    offs_d,
    start,
    end,
    Tq,
    Tk,
    qk_scale,
    seed,
    offset,
    bh,
    dropout_p,
    drop_scale,
    IS_CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K_bh, offs_n, offs_d, Tk, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        v = _load_rows(V_bh, offs_n, offs_d, Tk, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        p, _, dp = _bwd_tile(
            q,
            k,
            do,
            v,
            lse2[:, None],
            offs_m[:, None],
            offs_n[None, :],
            Tq,
            Tk,
            qk_scale,
            seed,
            offset,
            bh,
            dropout_p,
            drop_scale,
            IS_CAUSAL,
            MASKED,
            False,
            HAS_DROPOUT,
            DOT_PRECISION,
        )
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION)
    return dq


# Cost: 6·D flops per visible pair (S, dP, dQ); reads Q, dO, lse, Δ once, K, V once per query
# block; writes dQ once. With the dK/dV kernel: attention_bwd_cost() (algorithmic 10·D/pair).
@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DQ,
    qk_scale,
    sm_scale,
    Tq,
    Tk,
    seed,
    offset,
    dropout_p,
    TQ_BUCKET,
    TK_BUCKET,
    HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows owned by the program
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = bh * Tq * HEAD_DIM
    kv_base = bh * Tk * HEAD_DIM
    q = _load_rows(Q + q_base, offs_m, offs_d, Tq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    do = _load_rows(DOut + q_base, offs_m, offs_d, Tq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    row_mask = offs_m < Tq
    lse2 = tl.load(Lse + bh * Tq + offs_m, mask=row_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + bh * Tq + offs_m, mask=row_mask, other=0.0)

    m0 = start_m * BLOCK_M
    if IS_CAUSAL:
        full = tl.minimum(tl.maximum(m0 + Tk - Tq + 1, 0), Tk)
        hi = tl.minimum(tl.maximum(tl.minimum(m0 + BLOCK_M, Tq) + Tk - Tq, 0), Tk)
    else:
        full = Tk
        hi = Tk
    full = (full // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    drop_scale = 1.0 / (1.0 - dropout_p)
    dq = _bwd_dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        K + kv_base,
        V + kv_base,
        offs_m,
        offs_d,
        0,
        full,
        Tq,
        Tk,
        qk_scale,
        seed,
        offset,
        bh,
        dropout_p,
        drop_scale,
        IS_CAUSAL,
        False,
        HAS_DROPOUT,
        HEAD_DIM,
        BLOCK_N,
        BLOCK_D,
        DOT_PRECISION,
    )
    dq = _bwd_dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        K + kv_base,
        V + kv_base,
        offs_m,
        offs_d,
        full,
        hi,
        Tq,
        Tk,
        qk_scale,
        seed,
        offset,
        bh,
        dropout_p,
        drop_scale,
        IS_CAUSAL,
        True,
        HAS_DROPOUT,
        HEAD_DIM,
        BLOCK_N,
        BLOCK_D,
        DOT_PRECISION,
    )
    _store_rows(DQ + q_base, dq * sm_scale, offs_m, offs_d, Tq, HEAD_DIM, BLOCK_D != HEAD_DIM)


@triton.jit
def _dropout_mask_kernel(Keep, Tq, Tk, seed, offset, dropout_p, BLOCK: tl.constexpr):
    # Test helper: the keep mask (B·H, Tq, Tk) as int8, drawn exactly as the attention kernels do.
    bh = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = _dropout_keep(seed, offset, bh, rows[:, None], cols[None, :], Tq, Tk, dropout_p)
    mask = (rows[:, None] < Tq) & (cols[None, :] < Tk)
    tl.store(Keep + (bh * Tq + rows[:, None]) * Tk + cols[None, :], keep.to(tl.int8), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------


def _cfg(block_m, block_n, num_warps, num_stages):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages
    )


# H100-sized configs of the 16-bit dtypes per head-dim class and kernel; the first of each list is
# the default (the one autotuning starts from, and the one that must not spill on sm_90a; the
# interpreter runs _INTERPRET_BLOCK instead). D <= 64 affords 128-row tiles; D = 128 keeps the
# fp32 accumulators (BLOCK x 128 per program) within ~128 registers/thread by pairing 128-row
# tiles with 8 warps; D = 256 drops to 64/32-row tiles.
_FWD_CONFIGS = {
    64: [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 4)],
    128: [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3), _cfg(128, 128, 8, 2)],
    256: [_cfg(64, 64, 8, 2), _cfg(64, 32, 8, 3), _cfg(128, 32, 8, 2)],
}
# dK/dV: BLOCK_N keys owned (dK, dV accumulators), BLOCK_M queries per step.
_BWD_DKDV_CONFIGS = {
    64: [_cfg(32, 128, 8, 3), _cfg(64, 64, 8, 3), _cfg(32, 64, 4, 3)],
    128: [_cfg(32, 64, 8, 3), _cfg(64, 32, 8, 2), _cfg(32, 128, 8, 2)],
    256: [_cfg(32, 32, 8, 2), _cfg(16, 32, 8, 2)],
}
# dQ: BLOCK_M queries owned (the dQ accumulator), BLOCK_N keys per step.
_BWD_DQ_CONFIGS = {
    64: [_cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 3)],
    128: [_cfg(64, 64, 8, 3), _cfg(128, 32, 8, 2), _cfg(64, 32, 4, 3)],
    256: [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2), _cfg(32, 64, 8, 2)],
}
_DECODE_CONFIGS = {
    64: [
        _cfg(_DECODE_BLOCK_M, _DECODE_BLOCK_N, 4, 3),
        _cfg(_DECODE_BLOCK_M, _DECODE_BLOCK_N, 4, 4),
    ],
    128: [
        _cfg(_DECODE_BLOCK_M, _DECODE_BLOCK_N, 4, 3),
        _cfg(_DECODE_BLOCK_M, _DECODE_BLOCK_N, 8, 2),
    ],
    256: [
        _cfg(_DECODE_BLOCK_M, _DECODE_BLOCK_N, 4, 2),
        _cfg(_DECODE_BLOCK_M, _DECODE_BLOCK_N, 8, 2),
    ],
}
_CONFIGS = {
    "fwd": _FWD_CONFIGS,
    "dkdv": _BWD_DKDV_CONFIGS,
    "dq": _BWD_DQ_CONFIGS,
    "decode": _DECODE_CONFIGS,
}
# The interpreter's fixed config: small tiles, so the ragged tails, the diagonal and several
# blocks per row are all exercised at test sizes.
_INTERPRET_BLOCK = {"BLOCK_M": 16, "BLOCK_N": 16}


def _d_class(head_dim):
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


# fp32 inputs: IEEE fp32 dots have no tensor-core path, so they run as FMA loops whose operand
# tiles live in registers; the 16-bit tiles above spill (7.8 KB at D=64 on sm_90a). fp32 gets
# one small config per head-dim class: it is the accuracy path, not the fast one. (3xTF32,
# `input_precision="tf32x3"`, was tried: it spills as well from D = 128 on.) Each of these was
# chosen from the report as the largest tile that does not spill on sm_90a.
_FP32_CONFIGS = {
    "fwd": {64: [_cfg(64, 32, 8, 2)], 128: [_cfg(16, 16, 4, 1)], 256: [_cfg(16, 16, 4, 1)]},
    "dkdv": {64: [_cfg(32, 32, 8, 2)], 128: [_cfg(16, 32, 8, 1)], 256: [_cfg(16, 16, 4, 1)]},
    "dq": {64: [_cfg(64, 32, 8, 2)], 128: [_cfg(32, 16, 4, 2)], 256: [_cfg(16, 16, 4, 1)]},
    # BLOCK_N divides _DECODE_BLOCK_N, so the launcher's splits stay whole blocks.
    "decode": {d: [_cfg(_DECODE_BLOCK_M, 16, 4, 1)] for d in (64, 128, 256)},
}


def _configs(table, head_dim, elt_bytes, dropout=False):
    """The configs of one kernel (`table`: "fwd", "dkdv", "dq" or "decode") for a head dim,
    dtype size and dropout flag.

    Dropout's Philox rounds (per score element, in registers beside the tiles) spill the 16-bit
    configs on sm_90a: with dropout they get 8 warps, and above D = 64 the score tile is halved
    too, along the inner loop's step (keys for fwd/dq/decode, queries for dK/dV)."""
    d_class = _d_class(head_dim)
    tables = _FP32_CONFIGS if elt_bytes == 4 else _CONFIGS
    configs = []
    for c in tables[table][d_class]:
        kwargs = dict(c.kwargs)
        num_warps = c.num_warps
        if dropout and elt_bytes != 4:
            num_warps = max(num_warps, 8)
            if d_class > 64:
                step = "BLOCK_M" if table == "dkdv" else "BLOCK_N"
                kwargs[step] = max(kwargs[step] // 2, 16)
        configs.append(triton.Config(kwargs, num_warps=num_warps, num_stages=c.num_stages))
    return configs


def _prune_for(table):
    def prune(configs, named_args, **kwargs):
        # Each kernel holds one config list per head-dim class; keep the class of this call.
        # (The autotune cache key includes the tensors' dtypes, so pruning by dtype is sound.)
        args = {**named_args, **kwargs}
        return _configs(table, args["HEAD_DIM"], args["Q"].element_size(), args["HAS_DROPOUT"])

    return prune


_BLOCK_D_HEURISTIC = {"BLOCK_D": lambda args: triton.next_power_of_2(args["HEAD_DIM"])}
_AUTOTUNE_KEY = ["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "IS_CAUSAL", "HAS_DROPOUT"]


def _tuned(kernel, table, key=_AUTOTUNE_KEY):
    """The GPU launcher of a kernel: autotune on top of the BLOCK_D heuristic. The configs are
    per (head-dim class, dtype): the early prune swaps the nominal list for this call's own."""
    with_heuristic = triton.heuristics(_BLOCK_D_HEURISTIC)(kernel)
    return triton.autotune(
        configs=_CONFIGS[table][64],
        key=key,
        prune_configs_by={"early_config_prune": _prune_for(table)},
    )(with_heuristic)


if not _INTERPRET:
    _fwd_launch = _tuned(_attn_fwd_kernel, "fwd")
    _dkdv_launch = _tuned(_attn_bwd_dkdv_kernel, "dkdv")
    _dq_launch = _tuned(_attn_bwd_dq_kernel, "dq")
    _decode_launch = _tuned(
        _attn_decode_kernel,
        "decode",
        key=["TK_BUCKET", "HEAD_DIM", "IS_CAUSAL", "HAS_DROPOUT"],
    )


def _launch(kernel, tuned_name, grid, *args, **constexprs):
    """Launch on the GPU through the autotuner, or under the interpreter with the fixed config.

    `grid(meta)` gets the chosen config's meta-parameters (BLOCK_M, BLOCK_N)."""
    if _INTERPRET:
        meta = dict(_INTERPRET_BLOCK)
        meta["BLOCK_D"] = triton.next_power_of_2(constexprs["HEAD_DIM"])
        kernel[grid(meta)](*args, **constexprs, **meta, num_warps=4)
    else:
        globals()[tuned_name][grid](*args, **constexprs)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


@functools.lru_cache
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, as on a small GPU


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q, k, v):
    assert q.dim() == 4 and k.shape == v.shape and q.shape[:2] == k.shape[:2], (q.shape, k.shape)
    assert q.shape[-1] == k.shape[-1], (q.shape, k.shape)
    assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()


def _use_decode(Tq, Tk):
    return Tq <= DECODE_MAX_TQ and Tk >= DECODE_MIN_TK


def _seed_int(seed):
    """The custom ops pass the dropout seed as a one-element int64 CPU tensor (None without
    dropout); the kernels take it as a plain integer. Direct callers may pass an int."""
    return 0 if seed is None else int(seed)


def attention_fwd(q, k, v, scale, is_causal, dropout_p, seed, offset):
    """softmax(q·kᵀ·scale (+ causal mask)) (with dropout) · v.

    q (B, H, Tq, D), k and v (B, H, Tk, D), contiguous, one dtype (fp32/fp16/bf16), any D up to
    256. Returns (out, lse): out like q; lse (B, H, Tq) fp32, natural-log logsumexp of the scaled
    scores, -inf (with out = 0) for rows that see no key. Short queries against long keys
    (Tq <= DECODE_MAX_TQ, Tk >= DECODE_MIN_TK) run the split-K decode kernels.
    Cost: `attention_fwd_cost(B, H, Tq, Tk, D, q.element_size(), is_causal)`.
    """
    _check(q, k, v)
    seed = _seed_int(seed)
    if _use_decode(q.shape[2], k.shape[2]):
        return attention_decode_fwd(q, k, v, scale, is_causal, dropout_p, seed, offset)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if Tk == 0:
        return out.zero_(), lse.fill_(float("-inf"))

    def grid(meta):
        return (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)

    _launch(
        _attn_fwd_kernel, "_fwd_launch", grid,
        q, k, v, out, lse, scale * LOG2E, Tq, Tk, seed, offset, float(dropout_p),
        triton.next_power_of_2(Tq), triton.next_power_of_2(Tk),
        HEAD_DIM=D, IS_CAUSAL=bool(is_causal), HAS_DROPOUT=dropout_p > 0.0,
        DOT_PRECISION=_dot_precision(q.dtype),
    )  # fmt: skip
    return out, lse


def _decode_splits(BH, Tk, device, num_splits=None):
    """(num_splits, keys_per_split): about two waves of programs over the SMs, each split a
    whole number of key blocks."""
    blocks = triton.cdiv(Tk, _DECODE_BLOCK_N)
    if num_splits is None:
        num_splits = triton.cdiv(2 * _num_sms(device), BH)
    num_splits = max(1, min(num_splits, blocks))
    keys_per_split = triton.cdiv(blocks, num_splits) * _DECODE_BLOCK_N
    return triton.cdiv(Tk, keys_per_split), keys_per_split


def attention_decode_fwd(q, k, v, scale, is_causal, dropout_p, seed, offset, num_splits=None):
    """The split-K forward, for Tq <= DECODE_MAX_TQ; same contract as `attention_fwd`.

    num_splits overrides the split count (tests). Cost: as `attention_fwd`, plus the fp32
    partials: writes and reads B·H·splits·Tq·(D + 1)·4 bytes."""
    _check(q, k, v)
    seed = _seed_int(seed)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    assert Tq <= _DECODE_BLOCK_M, f"the decode kernel takes at most {_DECODE_BLOCK_M} queries"
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if Tk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    splits, keys_per_split = _decode_splits(B * H, Tk, q.device, num_splits)
    part_out = torch.empty((B * H, splits, Tq, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B * H, splits, Tq), dtype=torch.float32, device=q.device)

    def grid(meta):
        return (splits, B * H)

    _launch(
        _attn_decode_kernel, "_decode_launch", grid,
        q, k, v, part_out, part_lse, scale * LOG2E, Tq, Tk, seed, offset, float(dropout_p),
        keys_per_split, triton.next_power_of_2(Tk),
        HEAD_DIM=D, IS_CAUSAL=bool(is_causal), HAS_DROPOUT=dropout_p > 0.0,
        DOT_PRECISION=_dot_precision(q.dtype),
    )  # fmt: skip
    if _INTERPRET:
        assert keys_per_split % _INTERPRET_BLOCK["BLOCK_N"] == 0
    _attn_decode_combine_kernel[(B * H * Tq,)](
        part_out, part_lse, out, lse, Tq, splits,
        HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=triton.next_power_of_2(D),
        num_warps=1 if D <= 64 else 2,
    )  # fmt: skip
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, scale, is_causal, dropout_p, seed, offset):
    """Gradients (dq, dk, dv) of `attention_fwd` given dout and its (out, lse), each in its
    input's dtype. Deterministic (no atomics); the dropout mask is regenerated from (seed,
    offset). Cost: `attention_bwd_cost(B, H, Tq, Tk, D, q.element_size(), is_causal)`."""
    _check(q, k, v)
    seed = _seed_int(seed)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if Tq == 0 or Tk == 0 or B * H == 0 or D == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout = dout.contiguous()
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    n_rows = B * H * Tq
    _attn_bwd_preprocess_kernel[(triton.cdiv(n_rows, _PRE_BLOCK_M),)](
        out, dout, delta, n_rows,
        HEAD_DIM=D, BLOCK_M=_PRE_BLOCK_M, BLOCK_D=triton.next_power_of_2(D),
        num_warps=_PRE_NUM_WARPS,
    )  # fmt: skip
    common = (scale * LOG2E, scale, Tq, Tk, seed, offset, float(dropout_p),
              triton.next_power_of_2(Tq), triton.next_power_of_2(Tk))  # fmt: skip
    flags = {
        "HEAD_DIM": D,
        "IS_CAUSAL": bool(is_causal),
        "HAS_DROPOUT": dropout_p > 0.0,
        "DOT_PRECISION": _dot_precision(q.dtype),
    }

    def kv_grid(meta):
        return (triton.cdiv(Tk, meta["BLOCK_N"]), B * H)

    def q_grid(meta):
        return (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)

    _launch(_attn_bwd_dkdv_kernel, "_dkdv_launch", kv_grid,
            q, k, v, dout, lse, delta, dk, dv, *common, **flags)  # fmt: skip
    _launch(_attn_bwd_dq_kernel, "_dq_launch", q_grid,
            q, k, v, dout, lse, delta, dq, *common, **flags)  # fmt: skip
    return dq, dk, dv


def dropout_mask(B, H, Tq, Tk, dropout_p, seed, offset, device="cpu"):
    """The keep mask (B, H, Tq, Tk) bool that attention with these (seed, offset) applies: for
    tests, to build a reference with the same mask. Small shapes only."""
    keep = torch.empty((B, H, Tq, Tk), dtype=torch.int8, device=device)
    grid = (triton.cdiv(Tq, _MASK_BLOCK), triton.cdiv(Tk, _MASK_BLOCK), B * H)
    _dropout_mask_kernel[grid](keep, Tq, Tk, seed, offset, float(dropout_p), BLOCK=_MASK_BLOCK)
    return keep.bool()


# ---------------------------------------------------------------------------------------------
# Cost model, for benchmarks (TFLOP/s, GB/s)
# ---------------------------------------------------------------------------------------------


def _visible_pairs(Tq, Tk, is_causal):
    """Number of (i, j) pairs computed: all of them, or those with j <= i + Tk - Tq."""
    if not is_causal:
        return Tq * Tk
    shift = Tk - Tq
    # Row i sees min(Tk, max(0, i + shift + 1)) keys.
    return sum(min(Tk, max(0, i + shift + 1)) for i in range(Tq)) if Tq <= 65536 else (Tq * Tk // 2)


def attention_fwd_cost(B, H, Tq, Tk, D, elt_bytes, is_causal):
    """(flops, bytes) of one forward: the two matmuls (2·D flops per pair each) over the visible
    pairs, and the minimal DRAM traffic (q, k, v read, out written once; lse in fp32)."""
    pairs = B * H * _visible_pairs(Tq, Tk, is_causal)
    flops = 4 * pairs * D
    nbytes = (2 * B * H * Tq + 2 * B * H * Tk) * D * elt_bytes + 4 * B * H * Tq
    return flops, nbytes


def attention_bwd_cost(B, H, Tq, Tk, D, elt_bytes, is_causal):
    """(flops, bytes) of one backward: five matmuls over the visible pairs (Q·Kᵀ recomputed, dV,
    dP, dQ, dK: 2·D flops per pair each), as flash-attention counts it; DRAM traffic of q, k, v,
    out, dout read, dq, dk, dv written, lse and Δ in fp32."""
    pairs = B * H * _visible_pairs(Tq, Tk, is_causal)
    flops = 10 * pairs * D
    nq, nk = B * H * Tq, B * H * Tk
    nbytes = (3 * nq + 2 * nk) * D * elt_bytes + (nq + 2 * nk) * D * elt_bytes + 8 * nq
    return flops, nbytes


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (python -m fastgpt.triton.report)
# ---------------------------------------------------------------------------------------------

_ELT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_SCALARS = {
    "qk_scale": "fp32",
    "sm_scale": "fp32",
    "Tq": "i32",
    "Tk": "i32",
    "seed": "i64",
    "offset": "i64",
    "dropout_p": "fp32",
    "TQ_BUCKET": "i32",
    "TK_BUCKET": "i32",
    "keys_per_split": "i32",
    "n_rows": "i32",
    "num_splits": "i32",
}
_FP32_POINTERS = {"Lse", "Delta", "PartOut", "PartLse"}


def _signature(kernel, dtype):
    ptr = POINTER_TYPES[dtype]
    signature = {}
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    for name in kernel.arg_names:
        if name in constexpr_names:
            signature[name] = "constexpr"
        elif name in _SCALARS:
            signature[name] = _SCALARS[name]
        else:
            signature[name] = "*fp32" if name in _FP32_POINTERS else ptr
    return signature


def _spec(kernel, dtype, constexprs, num_warps, num_stages, label):
    signature = _signature(kernel, dtype)
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in constexprs]
    assert not missing, (kernel.__name__, missing)
    # What the JIT specializes at run time: 16-byte aligned torch allocations.
    divisible = [name for name, ty in signature.items() if ty.startswith("*")]
    return {
        "kernel": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "divisible_by_16": divisible,
        "options": {"num_warps": num_warps, "num_stages": num_stages},
        "config": label,
    }


def _main_spec(kernel, table, head_dim, dtype, causal, dropout, config_index):
    config = _configs(table, head_dim, _ELT_BYTES[dtype], dropout)[config_index]
    constexprs = {
        "HEAD_DIM": head_dim,
        "IS_CAUSAL": causal,
        "HAS_DROPOUT": dropout,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
        "BLOCK_D": triton.next_power_of_2(head_dim),
        **config.kwargs,
    }
    flags = ("causal" if causal else "full") + (" dropout" if dropout else "")
    label = (
        f"D={head_dim} {dtype} {flags} BLOCK_M={config.kwargs['BLOCK_M']} "
        f"BLOCK_N={config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}"
        + (" (default)" if config_index == 0 else "")
    )
    return _spec(kernel, dtype, constexprs, config.num_warps, config.num_stages, label)


_MAIN_KERNELS = (
    (_attn_fwd_kernel, "fwd"),
    (_attn_bwd_dkdv_kernel, "dkdv"),
    (_attn_bwd_dq_kernel, "dq"),
    (_attn_decode_kernel, "decode"),
)
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)


def AOT_SPECS():
    """Every kernel in every autotune config: all configs of each head-dim class for bf16 causal
    at its largest D (the register-heaviest member of the class: 64, 128, 256); the default
    config at every supported head dim; the default config in fp16 and fp32, non-causal, and with
    dropout at D = 64 and 128; the preprocess and combine kernels per dtype."""
    specs = []
    for kernel, table in _MAIN_KERNELS:
        for head_dim in (64, 128, 256):
            for index in range(len(_CONFIGS[table][head_dim])):
                specs.append(_main_spec(kernel, table, head_dim, "bf16", True, False, index))
        for head_dim in HEAD_DIMS:
            if head_dim not in (64, 128, 256):
                specs.append(_main_spec(kernel, table, head_dim, "bf16", True, False, 0))
        for head_dim in (64, 128):
            specs.append(_main_spec(kernel, table, head_dim, "bf16", False, False, 0))
            specs.append(_main_spec(kernel, table, head_dim, "bf16", True, True, 0))
            specs.append(_main_spec(kernel, table, head_dim, "fp16", True, False, 0))
            specs.append(_main_spec(kernel, table, head_dim, "fp32", True, False, 0))
    for dtype in ("bf16", "fp16", "fp32"):
        for head_dim in (64, 80, 128):
            block_d = triton.next_power_of_2(head_dim)
            specs.append(_spec(
                _attn_bwd_preprocess_kernel, dtype,
                {"HEAD_DIM": head_dim, "BLOCK_M": _PRE_BLOCK_M, "BLOCK_D": block_d},
                _PRE_NUM_WARPS, 3, f"D={head_dim} {dtype} BLOCK_M={_PRE_BLOCK_M}",
            ))  # fmt: skip
            specs.append(_spec(
                _attn_decode_combine_kernel, dtype,
                {"HEAD_DIM": head_dim, "BLOCK_S": 64, "BLOCK_D": block_d},
                1 if head_dim <= 64 else 2, 3, f"D={head_dim} {dtype} BLOCK_S=64",
            ))  # fmt: skip
    return specs
