// Flash attention on CPU: softmax(Q·Kᵀ·scale [+ causal mask]) [dropout] · V, memory O(T·D).
//
// q: (B, H, Tq, D), k/v: (B, H, Tk, D), contiguous, one dtype. Causal masking is bottom-right
// aligned (query i sees keys j <= i + Tk - Tq), as flash-attention does; a query that sees no key
// gives output 0 and lse = -inf.
//
// Forward: tasks of (batch·head, query block, K/V split). Each task walks its key blocks with an
// online softmax (running max m and sum l per row, in acc precision) and accumulates the
// unnormalised output in place; key blocks wholly above the causal diagonal are never visited.
// The two block products per step (S = Q·Kᵀ and O += P·V) are ATen's brgemm on pointers into the
// blocks (gemm::block_mm); it takes no transposed operands, so each thread keeps Kᵀ in panels
// (KtPanels). Splitting K/V only happens when there are too few (batch·head, query block) tasks
// for the threads (short queries, small B·H); the splits' partial (O, m, l) are then combined in
// a fixed order, so the result stays deterministic.
// Tq <= 8 (a decode step) has its own path without block products: see "decode" below.
//
// Backward: Δ = rowsum(dO∘O) first; then tasks of (batch·head, key-block split). A task owns its
// key blocks, so it writes dK, dV without atomics; it recomputes P = exp(S·scale - lse) for every
// query block that sees the key block (as Pᵀ: see "backward" below) and adds (dS·K)ᵀ into a dQᵀ
// that it owns too: the whole batch·head's when splits = 1 (the usual case: B·H covers the
// threads), else a per-split partial summed in split order at the end. Deterministic for a given
// thread count.
//
// Dropout: keep(b·h, i, j) comes from a splitmix64 hash of (seed, offset + flat index), so the
// backward regenerates the forward's mask without storing it. The seed arrives as a tensor (see
// seed_value).
//
// bf16/fp16 inputs are widened to fp32 once (O(T·D)) and the results rounded once on the way out
// (the decode path reads K and V as they are, widening in registers); float64 (gradcheck)
// computes in double.
#include "common.h"
#include "gemm.h"
#include "output_memory.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

namespace fastgpt {
namespace {

using at::vec::Vectorized;

// Block sizes (rows of Q x rows of K/V), tuned at B=2, H=12, T=1024, D=64 on this project's Zen 5
// machine (brgemm products; 64/128 query rows were 3-10% faster than 128/256 there, within the
// noise at D=128 and at T=128). Forward: a 64 x 256 fp32 score block (64 KiB) stays in L2 with
// its Q block, Kᵀ panel and V block while the two products run. Backward: narrow key blocks (64)
// keep the causal waste (the masked triangle of the diagonal block) small, since a key block's
// query range starts exactly at its first visible query.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 256;
constexpr int64_t kBwdQ = 128;
constexpr int64_t kBwdK = 64;

// ---- block products and transposes --------------------------------------------------------------

// C (m x n, leading dim ldc) = [C +] A (m x k) · B (k x n), every operand a row-major block of
// raw memory (gemm::block_mm: oneDNN's brgemm for fp32). Zero-sized blocks are handled here.
template <typename acc>
inline void mm(int64_t m, int64_t n, int64_t k, const acc* A, int64_t lda, const acc* B,
               int64_t ldb, acc* C, int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (int64_t r = 0; r < m; ++r) std::fill(C + r * ldc, C + r * ldc + n, acc(0));
    return;
  }
  gemm::block_mm(m, n, k, A, lda, B, ldb, C, ldc, accumulate);
}

// dst (cols x rows, leading dim ldd) = src (rows x cols, leading dim lds)ᵀ, in 16 x 16 register
// tiles on AVX-512 (at::vec::transpose_mxn).
template <typename acc>
inline void transpose(const acc* src, int64_t rows, int64_t cols, int64_t lds, acc* dst,
                      int64_t ldd) {
  constexpr int64_t kTile = 64;  // bounds the generic (scalar) version's cache footprint
  for (int64_t r = 0; r < rows; r += kTile)
    for (int64_t c = 0; c < cols; c += kTile)
      at::vec::transpose_mxn<acc>(src + r * lds + c, lds, dst + c * ldd + r, ldd,
                                  static_cast<int>(std::min(kTile, rows - r)),
                                  static_cast<int>(std::min(kTile, cols - c)));
}

// The leading dim of a transposed (D x n) operand: n rounded up to 16 elements plus 16 more, so
// that its D rows are not a multiple of 4 KiB apart (rows that are all fall into the same few L1
// sets and evict each other while a product streams through them).
inline int64_t padded_ld(int64_t n) { return (n + 15) / 16 * 16 + 16; }

// ---- dropout mask -------------------------------------------------------------------------------

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// keep(counter) is true with probability 1 - p: the top 24 bits of a splitmix64 output of
// (seed, counter) compared against p·2²⁴. counter = offset + flat index of (b·h, i, j).
struct DropoutMask {
  bool on = false;
  uint64_t key = 0;
  uint64_t offset = 0;
  uint32_t threshold = 0;
  double keep_scale = 1.0;  // 1 / (1 - p)

  DropoutMask(double p, int64_t seed, int64_t off) {
    on = p > 0.0;
    if (!on) return;
    key = splitmix64(static_cast<uint64_t>(seed) + 0x9E3779B97F4A7C15ULL);
    offset = static_cast<uint64_t>(off);
    threshold = static_cast<uint32_t>(std::llround(p * 16777216.0));
    keep_scale = 1.0 / (1.0 - p);
  }
  bool keep(uint64_t counter) const {
    const uint64_t z = splitmix64(key + (offset + counter) * 0x9E3779B97F4A7C15ULL);
    return static_cast<uint32_t>(z >> 40) >= threshold;
  }

  // The most counters factors() takes at once: callers keep its output on the stack.
  static constexpr int64_t kChunk = 64;

  // z[i] = keep(counter0 + i·stride) ? kept : 0 for i < n <= kChunk. A plain loop of 64-bit
  // integer operations that the compiler vectorizes (AVX-512DQ's vpmullq; emulated 64-bit
  // multiplies on AVX2): the hash per element was as costly as the exp and the two products
  // around it, so the scalar mask made attention with dropout ~1.6x slower than without.
  template <typename acc>
  void factors(uint64_t counter0, uint64_t stride, int64_t n, acc kept, acc* z) const {
    const uint64_t k = key, first = offset + counter0;
    const uint32_t t = threshold;
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t h = splitmix64(k + (first + static_cast<uint64_t>(i) * stride) *
                                            0x9E3779B97F4A7C15ULL);
      z[i] = static_cast<uint32_t>(h >> 40) >= t ? kept : acc(0);
    }
  }

  // row[i] *= keep(counter0 + i) for i < n: the forward's mask (the 1/(1-p) comes at the end).
  template <typename acc>
  void apply(acc* row, int64_t n, uint64_t counter0) const {
    using Vec = Vectorized<acc>;
    alignas(64) acc z[kChunk];
    for (int64_t c = 0; c < n; c += kChunk) {
      const int64_t len = std::min(kChunk, n - c);
      factors(counter0 + c, 1, len, acc(1), z);
      int64_t i = 0;
      for (; i + Vec::size() <= len; i += Vec::size())
        (Vec::loadu(row + c + i) * Vec::loadu(z + i)).store(row + c + i);
      for (; i < len; ++i) row[c + i] *= z[i];
    }
  }
};

// ---- small row helpers (vectorized) -------------------------------------------------------------

template <typename acc>
inline Vectorized<acc> vexp(const Vectorized<acc>& x) {
  // exp_u20 (a few ulp, ~2x faster than SLEEF's u10) for fp32; the exact exp for float64, which
  // gradcheck runs in.
  if constexpr (std::is_same_v<acc, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// max(row[0:n]) (n > 0).
template <typename acc>
inline acc row_max(const acc* row, int64_t n) {
  using Vec = Vectorized<acc>;
  Vec vmax(-std::numeric_limits<acc>::infinity());
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(row + j));
  acc mx = at::vec::vec_reduce_all<acc>([](auto& a, auto& b) { return at::vec::maximum(a, b); },
                                        vmax);
  for (; j < n; ++j) mx = std::max(mx, row[j]);
  return mx;
}

// row[0:n] *= scale; returns max(row[0:n]) (n > 0).
template <typename acc>
inline acc scale_and_max(acc* row, int64_t n, acc scale) {
  using Vec = Vectorized<acc>;
  const Vec vs(scale);
  Vec vmax(-std::numeric_limits<acc>::infinity());
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec v = Vec::loadu(row + j) * vs;
    v.store(row + j);
    vmax = at::vec::maximum(vmax, v);
  }
  acc mx = at::vec::vec_reduce_all<acc>([](auto& a, auto& b) { return at::vec::maximum(a, b); },
                                        vmax);
  for (; j < n; ++j) {
    row[j] *= scale;
    mx = std::max(mx, row[j]);
  }
  return mx;
}

// row[0:n] = exp(row[0:n] * mul - sub); returns the sum (the exp fused with the row sum).
template <typename acc>
inline acc exp_sum(acc* row, int64_t n, acc mul, acc sub) {
  using Vec = Vectorized<acc>;
  const Vec vm(mul), vsub(sub);
  Vec vsum(0);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = vexp(at::vec::fmsub(Vec::loadu(row + j), vm, vsub));
    e.store(row + j);
    vsum = vsum + e;
  }
  acc sum = hsum(vsum);
  for (; j < n; ++j) {
    row[j] = std::exp(row[j] * mul - sub);
    sum += row[j];
  }
  return sum;
}

// One online-softmax step on a row of raw scores s[0:n] (n > 0): mnew = max(m_old, max(s·scale)),
// row[j] = exp(s_j·scale - mnew) in place; returns (mnew, Σ_j row[j]). For scale > 0 the scores
// are not scaled in place: max(s·scale) = scale·max(s) and the exp applies the scale, so the max
// pass only reads the row.
template <typename acc>
inline std::pair<acc, acc> online_exp_row(acc* row, int64_t n, acc scale, acc m_old) {
  if (scale > acc(0)) {
    const acc mnew = std::max(m_old, scale * row_max(row, n));
    return {mnew, exp_sum(row, n, scale, mnew)};
  }
  const acc mnew = std::max(m_old, scale_and_max(row, n, scale));
  return {mnew, exp_sum(row, n, acc(1), mnew)};
}

template <typename acc>
inline void scale_row(acc* row, int64_t n, acc s) {
  using Vec = Vectorized<acc>;
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(row + j) * Vec(s)).store(row + j);
  for (; j < n; ++j) row[j] *= s;
}

// a·b over n values; b in acc or, for the decode path's K rows, in the storage dtype.
template <typename acc, typename T>
inline acc dot(const acc* a, const T* b, int64_t n) {
  using Vec = Vectorized<acc>;
  Vec vs(0);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size())
    vs = at::vec::fmadd(Vec::loadu(a + j), load_as<acc>(b + j), vs);
  acc s = hsum(vs);
  for (; j < n; ++j) s += a[j] * static_cast<acc>(b[j]);
  return s;
}

// ---- shapes and work split ----------------------------------------------------------------------

struct Problem {
  int64_t BH, Tq, Tk, D;
  bool causal;
  int64_t off;  // Tk - Tq: query i sees keys j <= i + off when causal

  // Keys [0, key_end(i)) are visible to query i.
  int64_t key_end(int64_t i) const {
    return causal ? std::clamp<int64_t>(i + off + 1, 0, Tk) : Tk;
  }
  int64_t blocks_q() const { return (Tq + kBlockQ - 1) / kBlockQ; }
};

// How many ways to split the key blocks so that `tasks` independent tasks keep every thread
// busy: 1 when there are enough tasks (the usual case), else up to 4 tasks per thread.
inline int64_t splits_for(int64_t tasks, int64_t key_blocks) {
  const int64_t nth = at::get_num_threads();
  if (tasks >= 4 * nth || (tasks >= nth && tasks % nth == 0) || key_blocks <= 1) return 1;
  return std::clamp<int64_t>((4 * nth + tasks - 1) / tasks, 1, key_blocks);
}

// ---- forward ------------------------------------------------------------------------------------

// Kᵀ for the forward's S = Q·Kᵀ, one thread's copy: panel kb holds keys [kb·bk, kb·bk + bk) of
// one batch·head as a D x bk block (leading dim ld), transposed from K the first time a task of
// that batch·head needs it. A thread's tasks come in runs of one batch·head, so it transposes
// each key block about once per batch·head: O(Tk·D) work against the products' O(Tq·Tk·D).
template <typename acc>
struct KtPanels {
  acc* data;
  int64_t* owner;  // the batch·head each panel holds (-1: none yet)
  int64_t D, bk, ld, Tk;

  const acc* get(const acc* kp, int64_t bh, int64_t kb) {
    acc* p = data + kb * D * ld;
    if (owner[kb] != bh) {
      const int64_t k0 = kb * bk, mk = std::min(bk, Tk - k0);
      transpose(kp + (bh * Tk + k0) * D, mk, D, D, p, ld);
      owner[kb] = bh;
    }
    return p;
  }
};

// One (batch·head, query block, split): accumulates the unnormalised output O (mq x D) and the
// running (m, l) of rows q0 .. q0+mq over the key blocks kb ≡ split (mod splits).
template <typename acc>
void forward_block(const Problem& pb, const acc* qp, const acc* kp, const acc* vp, acc scale,
                   const DropoutMask& drop, int64_t bh, int64_t q0, int64_t mq, int64_t split,
                   int64_t splits, int64_t bk, acc* O, acc* m, acc* l, acc* S,
                   KtPanels<acc>& kt) {
  const int64_t D = pb.D;
  const acc* Q = qp + (bh * pb.Tq + q0) * D;
  std::fill(O, O + mq * D, acc(0));
  std::fill(m, m + mq, -std::numeric_limits<acc>::infinity());
  std::fill(l, l + mq, acc(0));
  const int64_t kend = pb.key_end(q0 + mq - 1);  // the last row sees the most keys
  for (int64_t k0 = split * bk; k0 < kend; k0 += splits * bk) {
    const int64_t mk = std::min(bk, kend - k0);
    const acc* V = vp + (bh * pb.Tk + k0) * D;
    mm(mq, mk, D, Q, D, kt.get(kp, bh, k0 / bk), kt.ld, S, mk, false);  // S = Q·Kᵀ
    for (int64_t r = 0; r < mq; ++r) {
      acc* row = S + r * mk;
      const int64_t n = std::clamp<int64_t>(pb.key_end(q0 + r) - k0, 0, mk);
      if (n == 0) {  // this row sees no key of this block (above the causal diagonal)
        std::fill(row, row + mk, acc(0));
        continue;
      }
      const auto [mnew, sum] = online_exp_row(row, n, scale, m[r]);
      std::fill(row + n, row + mk, acc(0));
      const acc alpha = std::exp(m[r] - mnew);  // 0 for the first block (m = -inf)
      l[r] = l[r] * alpha + sum;
      m[r] = mnew;
      if (alpha != acc(1)) scale_row(O + r * D, D, alpha);
      if (drop.on) drop.apply(row, n, static_cast<uint64_t>((bh * pb.Tq + q0 + r) * pb.Tk + k0));
    }
    mm(mq, D, mk, S, mk, V, D, O, D, true);  // O += P·V
  }
}

// out row = O / l (· 1/(1-p)), lse = m + log(l); a row with l = 0 saw no key: 0 and -inf.
template <typename acc>
inline void finish_row(acc* out, acc m, acc l, int64_t D, acc keep_scale, acc* lse) {
  if (l > acc(0)) {
    scale_row(out, D, keep_scale / l);
    *lse = m + std::log(l);
  } else {
    std::fill(out, out + D, acc(0));
    *lse = -std::numeric_limits<acc>::infinity();
  }
}

// Combine K/V-split partials in split order: m = max m_s, l = Σ l_s e^(m_s - m),
// O = Σ O_s e^(m_s - m), then out = O / l and lse = m + log l. po: (splits, rows, D) unnormalised
// outputs; pm: (splits, 2, rows) running max and sum of each split.
template <typename acc>
void combine_splits(const acc* po, const acc* pm, int64_t splits, int64_t rows, int64_t D,
                    acc keep_scale, acc* op, acc* lp) {
  at::parallel_for(0, rows, row_grain(splits * D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      acc mx = -std::numeric_limits<acc>::infinity();
      for (int64_t s = 0; s < splits; ++s) mx = std::max(mx, pm[s * 2 * rows + row]);
      acc* o = op + row * D;
      std::fill(o, o + D, acc(0));
      acc lsum = 0;
      if (mx != -std::numeric_limits<acc>::infinity()) {
        for (int64_t s = 0; s < splits; ++s) {
          const acc ms = pm[s * 2 * rows + row];
          if (ms == -std::numeric_limits<acc>::infinity()) continue;  // split saw no key
          const acc w = std::exp(ms - mx);
          lsum += pm[s * 2 * rows + rows + row] * w;
          const acc* os = po + (s * rows + row) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += w * os[d];
        }
      }
      finish_row(o, mx, lsum, D, keep_scale, lp + row);
    }
  });
}

// ---- decode: a few query rows per batch·head against a long cache ------------------------------
//
// A decode step (Tq = 1) is a matrix-vector product on each side of the softmax and is bound by
// reading K and V once. Block GEMMs with one row waste most of their time in call overhead and
// packing, so this path works on rows directly: scores s_j = q·K_j over a chunk of keys (one
// vector dot per key), the chunk's max and exps, then O += Σ p_j V_j (one vector FMA per key
// and D-lane). It takes up to kDecodeRows query rows: a grouped-query decode step folds a group's
// queries into one batch·head (F.scaled_dot_product_attention's enable_gqa), and speculative or
// chunked decoding sends a few. The rows take each key chunk together, in register blocks of
// kRowBlock rows, so the chunk is read from memory once and each K and V vector is loaded once
// per block of rows. Tasks are (batch·head, contiguous key range); more than one range per
// batch·head only when there are too few batch·heads for the threads, and those partials are
// combined as the general forward's splits are. K and V are read in their own dtype (bf16/fp16
// widened in registers): widening a whole cache first cost more than the step (a 16 MB bf16
// cache: 3x its bytes moved, and two fresh 32 MB buffers a call).
constexpr int64_t kDecodeRows = 8;

// The horizontal sums of four vectors. On AVX-512 fp32 they are folded together (two unpack and
// two shuffle levels shared by the four, then the four 128-bit lanes) instead of four separate
// reductions: about a third of the shuffles, which is what the dot products of a cached decode
// step (Tk ~ 1K) spend most of their time on.
template <typename acc>
inline void hsum4(const Vectorized<acc>& a0, const Vectorized<acc>& a1, const Vectorized<acc>& a2,
                  const Vectorized<acc>& a3, acc& s0, acc& s1, acc& s2, acc& s3) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc, float>) {
    const __m512 x0 = a0, x1 = a1, x2 = a2, x3 = a3;
    // Per 128-bit lane: [a0 a1 a0 a1] and [a2 a3 a2 a3] partial sums, then [a0 a1 a2 a3].
    const __m512 p01 = _mm512_add_ps(_mm512_unpacklo_ps(x0, x1), _mm512_unpackhi_ps(x0, x1));
    const __m512 p23 = _mm512_add_ps(_mm512_unpacklo_ps(x2, x3), _mm512_unpackhi_ps(x2, x3));
    const __m512 p = _mm512_add_ps(_mm512_shuffle_ps(p01, p23, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(p01, p23, _MM_SHUFFLE(3, 2, 3, 2)));
    // Sum the four 128-bit lanes.
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(p), _mm512_extractf32x8_ps(p, 1));
    const __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    alignas(16) float out[4];
    _mm_store_ps(out, r);
    s0 = out[0];
    s1 = out[1];
    s2 = out[2];
    s3 = out[3];
    return;
  }
#endif
  s0 = hsum(a0);
  s1 = hsum(a1);
  s2 = hsum(a2);
  s3 = hsum(a3);
}

// Keys per chunk: the scores stay in L1 and the running max is rescaled once per chunk.
constexpr int64_t kDecodeChunk = 256;

// The rows of a register block: RB query rows share each K and V vector they load. RB rows x 4
// keys of score accumulators (plus 4 K and one Q vector), and RB rows x kTileVecs D-vectors of
// output accumulators (plus the V tile and one P broadcast), fit the 32 vector registers of
// AVX-512 at RB = 4 and the 16 of AVX2 at RB = 2. Row by row, a few query rows re-read the chunk
// from L2 for every row and ran 0.67x torch's masked attention at 4 rows x 1024 keys.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRowBlock = 4;
#else
constexpr int kRowBlock = 2;
#endif
constexpr int kTileVecs = 4;

// S_r[j] = q_r·K_j (S rows lds apart) for RB query rows Q (RB x D) and the n keys of a chunk, four
// keys at a time: four K vectors are loaded once for the RB rows, and each row's four FMA chains
// are independent. With prefetch_v, starts the chunk's V rows on their way to L2 while the dots
// run, so the P·V pass finds them in cache instead of opening a second miss stream.
template <int RB, typename acc, typename kv_t>
inline void block_scores(const acc* Q, const kv_t* K, const kv_t* V, int64_t n, int64_t D,
                         bool prefetch_v, acc* S, int64_t lds) {
  using Vec = Vectorized<acc>;
  constexpr int64_t L = Vec::size();
  const int64_t dv = D / L * L;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const kv_t* k_0 = K + j * D;
    if (prefetch_v) {
      const char* v_0 = reinterpret_cast<const char*>(V + j * D);
      for (int64_t b = 0; b < 4 * D * static_cast<int64_t>(sizeof(kv_t)); b += 64)
        __builtin_prefetch(v_0 + b, 0, 2);
    }
    Vec a[RB][4];
    for (int r = 0; r < RB; ++r)
      for (int c = 0; c < 4; ++c) a[r][c] = Vec(acc(0));
    for (int64_t d = 0; d < dv; d += L) {
      const Vec k0 = load_as<acc>(k_0 + d), k1 = load_as<acc>(k_0 + D + d),
                k2 = load_as<acc>(k_0 + 2 * D + d), k3 = load_as<acc>(k_0 + 3 * D + d);
      for (int r = 0; r < RB; ++r) {
        const Vec qv = Vec::loadu(Q + r * D + d);
        a[r][0] = at::vec::fmadd(qv, k0, a[r][0]);
        a[r][1] = at::vec::fmadd(qv, k1, a[r][1]);
        a[r][2] = at::vec::fmadd(qv, k2, a[r][2]);
        a[r][3] = at::vec::fmadd(qv, k3, a[r][3]);
      }
    }
    for (int r = 0; r < RB; ++r) {
      const acc* q = Q + r * D;
      acc s0, s1, s2, s3;
      hsum4(a[r][0], a[r][1], a[r][2], a[r][3], s0, s1, s2, s3);
      for (int64_t d = dv; d < D; ++d) {
        s0 += q[d] * static_cast<acc>(k_0[d]);
        s1 += q[d] * static_cast<acc>(k_0[D + d]);
        s2 += q[d] * static_cast<acc>(k_0[2 * D + d]);
        s3 += q[d] * static_cast<acc>(k_0[3 * D + d]);
      }
      acc* s = S + r * lds + j;
      s[0] = s0;
      s[1] = s1;
      s[2] = s2;
      s[3] = s3;
    }
  }
  for (; j < n; ++j)
    for (int r = 0; r < RB; ++r) S[r * lds + j] = dot(Q + r * D, K + j * D, D);
}

// O_r[d0, d0 + TB·L) += Σ_i S_r[i] V_i[d0, d0 + TB·L) for RB rows over n rows of V: the RB x TB
// output vectors stay in registers while the keys go by, and each V vector is loaded once for
// the RB rows.
template <int RB, int TB, typename acc, typename kv_t>
inline void pv_tile(const acc* S, int64_t lds, const kv_t* V, int64_t n, int64_t D, int64_t d0,
                    acc* O) {
  using Vec = Vectorized<acc>;
  constexpr int64_t L = Vec::size();
  Vec o[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) o[r][t] = Vec::loadu(O + r * D + d0 + t * L);
  for (int64_t i = 0; i < n; ++i) {
    const kv_t* vr = V + i * D + d0;
    Vec v[TB];
    for (int t = 0; t < TB; ++t) v[t] = load_as<acc>(vr + t * L);
    for (int r = 0; r < RB; ++r) {
      const Vec p(S[r * lds + i]);
      for (int t = 0; t < TB; ++t) o[r][t] = at::vec::fmadd(p, v[t], o[r][t]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) o[r][t].store(O + r * D + d0 + t * L);
}

// O_r (D values, rows D apart) += Σ_i S_r[i] V_i for RB rows over n rows of V, in tiles of up to
// kTileVecs D-vectors; the D % L tail lanes scalar.
template <int RB, typename acc, typename kv_t>
inline void block_pv(const acc* S, int64_t lds, const kv_t* V, int64_t n, int64_t D, acc* O) {
  constexpr int64_t L = Vectorized<acc>::size();
  const int64_t nv = D / L;
  int64_t t = 0;
  for (; t + kTileVecs <= nv; t += kTileVecs) pv_tile<RB, kTileVecs>(S, lds, V, n, D, t * L, O);
  switch (nv - t) {
    case 3: pv_tile<RB, 3>(S, lds, V, n, D, t * L, O); break;
    case 2: pv_tile<RB, 2>(S, lds, V, n, D, t * L, O); break;
    case 1: pv_tile<RB, 1>(S, lds, V, n, D, t * L, O); break;
    default: break;
  }
  for (int64_t d = nv * L; d < D; ++d) {
    for (int r = 0; r < RB; ++r) {
      acc sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += S[r * lds + i] * static_cast<acc>(V[i * D + d]);
      O[r * D + d] += sum;
    }
  }
}

// R query rows Q (R x D) of one batch·head against its keys [k0, k1), row r seeing the keys
// j < visible[r] (the causal limit, or Tk; nondecreasing in r). Leaves each row's unnormalised O
// (R x D), running max m and sum l. S: R x kDecodeChunk scratch. counter0: the dropout counter of
// (row 0, key 0); rows are Tk counters apart.
//
// Per chunk the rows that see any of its keys (a suffix: the causal limit moves one key a row)
// get their scores in register blocks, each row its own online-softmax step over the n_r keys it
// sees, then zeros past them, so that one P·V pass in register blocks serves every row.
template <typename acc, typename kv_t>
void decode_range(const acc* Q, int64_t R, const int64_t* visible, const kv_t* K, const kv_t* V,
                  int64_t D, int64_t Tk, acc scale, const DropoutMask& drop, uint64_t counter0,
                  int64_t k0, int64_t k1, acc* O, acc* m, acc* l, acc* S) {
  std::fill(O, O + R * D, acc(0));
  std::fill(m, m + R, -std::numeric_limits<acc>::infinity());
  std::fill(l, l + R, acc(0));
  constexpr int64_t lds = kDecodeChunk;
  for (int64_t c0 = k0; c0 < k1; c0 += kDecodeChunk) {
    const int64_t chunk = std::min(kDecodeChunk, k1 - c0);
    int64_t n[kDecodeRows];
    int64_t first = R;  // the first row that sees a key of this chunk
    for (int64_t r = R - 1; r >= 0; --r) {
      n[r] = std::clamp<int64_t>(visible[r] - c0, 0, chunk);
      if (n[r] > 0) first = r;
    }
    if (first == R) continue;  // every key of the chunk is past every row's causal limit
    const int64_t nmax = n[R - 1];
    const kv_t* Kc = K + c0 * D;
    const kv_t* Vc = V + c0 * D;
    for (int64_t r = first; r < R; r += kRowBlock) {
      with_count<kRowBlock>(std::min<int64_t>(kRowBlock, R - r), [&](auto rb) {
        block_scores<decltype(rb)::value>(Q + r * D, Kc, Vc, nmax, D, r == first, S + r * lds,
                                          lds);
      });
    }
    for (int64_t r = first; r < R; ++r) {
      acc* s = S + r * lds;
      acc* o = O + r * D;
      const auto [mnew, sum] = online_exp_row(s, n[r], scale, m[r]);
      const acc alpha = std::exp(m[r] - mnew);  // 0 for the first chunk (m = -inf)
      l[r] = l[r] * alpha + sum;
      m[r] = mnew;
      if (alpha != acc(1)) scale_row(o, D, alpha);
      if (drop.on) drop.apply(s, n[r], counter0 + static_cast<uint64_t>(r * Tk + c0));
      std::fill(s + n[r], s + nmax, acc(0));  // keys past this row's causal limit
    }
    for (int64_t r = first; r < R; r += kRowBlock) {
      with_count<kRowBlock>(std::min<int64_t>(kRowBlock, R - r), [&](auto rb) {
        block_pv<decltype(rb)::value>(S + r * lds, lds, Vc, nmax, D, O + r * D);
      });
    }
  }
}

// q: (B, H, R, D) in acc, R <= kDecodeRows; k, v: (B, H, Tk, D) in kv_t; out: like q (acc).
template <typename acc, typename kv_t>
void attention_decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             double scale_d, bool causal, const DropoutMask& drop, at::Tensor& out,
                             at::Tensor& lse) {
  const int64_t BH = q.size(0) * q.size(1), R = q.size(2), Tk = k.size(2), D = q.size(3);
  TORCH_INTERNAL_ASSERT(R >= 1 && R <= kDecodeRows);
  const acc scale = static_cast<acc>(scale_d), keep_scale = static_cast<acc>(drop.keep_scale);
  const acc* qp = q.const_data_ptr<acc>();
  const kv_t* kp = k.const_data_ptr<kv_t>();
  const kv_t* vp = v.const_data_ptr<kv_t>();
  acc* op = out.data_ptr<acc>();
  acc* lp = lse.data_ptr<acc>();
  // Bottom-right-aligned causal mask: row r sees keys j <= r + Tk - R.
  int64_t visible[kDecodeRows];
  for (int64_t r = 0; r < R; ++r)
    visible[r] = causal ? std::clamp<int64_t>(r + Tk - R + 1, 0, Tk) : Tk;
  // Split each batch·head's keys into ranges of at least 4 chunks when B·H alone leaves threads
  // idle (or unevenly loaded: 3 batch·heads on 2 threads).
  const int64_t splits = splits_for(BH, (Tk + 4 * kDecodeChunk - 1) / (4 * kDecodeChunk));
  const int64_t per_split = (Tk + splits - 1) / splits;
  const int64_t nth = at::get_num_threads(), rows = BH * R;
  at::Tensor scratch = at::empty({nth, kDecodeRows * kDecodeChunk}, q.options());
  at::Tensor part_o, part_ml;
  if (splits > 1) {
    part_o = at::empty({splits, rows, D}, q.options());
    part_ml = at::empty({splits, 2, rows}, q.options());
  }
  at::parallel_for(0, BH * splits, 1, [&](int64_t begin, int64_t end) {
    acc* S = scratch.data_ptr<acc>() + at::get_thread_num() * kDecodeRows * kDecodeChunk;
    acc m[kDecodeRows], l[kDecodeRows];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / splits, split = t % splits;
      const int64_t k0 = std::min(Tk, split * per_split), k1 = std::min(Tk, k0 + per_split);
      const acc* Q = qp + bh * R * D;
      const kv_t* K = kp + bh * Tk * D;
      const kv_t* V = vp + bh * Tk * D;
      const uint64_t counter0 = static_cast<uint64_t>(bh * R * Tk);  // flat index of (bh, 0, 0)
      if (splits == 1) {
        acc* O = op + bh * R * D;
        decode_range(Q, R, visible, K, V, D, Tk, scale, drop, counter0, 0, Tk, O, m, l, S);
        for (int64_t r = 0; r < R; ++r)
          finish_row(O + r * D, m[r], l[r], D, keep_scale, lp + bh * R + r);
      } else {
        acc* O = part_o.data_ptr<acc>() + (split * rows + bh * R) * D;
        decode_range(Q, R, visible, K, V, D, Tk, scale, drop, counter0, k0, k1, O, m, l, S);
        acc* pm = part_ml.data_ptr<acc>() + split * 2 * rows;
        for (int64_t r = 0; r < R; ++r) {
          pm[bh * R + r] = m[r];
          pm[rows + bh * R + r] = l[r];
        }
      }
    }
  });
  if (splits > 1)
    combine_splits(part_o.const_data_ptr<acc>(), part_ml.const_data_ptr<acc>(), splits, rows, D,
                   keep_scale, op, lp);
}

template <typename acc>
void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          double scale_d, bool causal, const DropoutMask& drop, at::Tensor& out,
                          at::Tensor& lse) {
  const Problem pb{q.size(0) * q.size(1), q.size(2), k.size(2), q.size(3), causal,
                   k.size(2) - q.size(2)};
  const int64_t D = pb.D, nqb = pb.blocks_q();
  const acc scale = static_cast<acc>(scale_d), keep_scale = static_cast<acc>(drop.keep_scale);
  const acc* qp = q.const_data_ptr<acc>();
  const acc* kp = k.const_data_ptr<acc>();
  const acc* vp = v.const_data_ptr<acc>();
  acc* op = out.data_ptr<acc>();
  acc* lp = lse.data_ptr<acc>();
  const int64_t tasks = pb.BH * nqb;
  // Short queries (past the decode path's 8 rows: a chunked prefill) take wider key blocks in the
  // same score scratch: fewer, longer block products for what is a memory-bound pass over K, V.
  const int64_t bk = std::clamp<int64_t>(kBlockQ * kBlockK / std::min(kBlockQ, pb.Tq), kBlockK,
                                         4096);
  const int64_t nkb = (pb.Tk + bk - 1) / bk;
  const int64_t splits = splits_for(tasks, nkb);

  // Per-thread scratch, allocated once: the score block, the row statistics (m, l) and the Kᵀ
  // panels.
  const int64_t nth = at::get_num_threads();
  const int64_t ldkt = bk + 16;  // not a multiple of 4 KiB: see padded_ld
  const int64_t per_thread = kBlockQ * kBlockK + 2 * kBlockQ + nkb * D * ldkt;
  at::Tensor scratch = at::empty({nth, per_thread}, q.options());
  at::Tensor owners = at::full({nth, nkb}, -1, q.options().dtype(at::kLong));
  // Partial results of the K/V splits (only when splitting: few, short queries).
  at::Tensor part_o, part_ml;
  if (splits > 1) {
    part_o = at::empty({splits, pb.BH * pb.Tq, D}, q.options());
    part_ml = at::empty({splits, 2, pb.BH * pb.Tq}, q.options());
  }

  // Task t -> (bh, query block, split). Within a batch·head, query blocks are taken light, heavy,
  // light, ... (0, n-1, 1, n-2, ...): with causal masking the contiguous runs of tasks that
  // at::parallel_for hands each thread then carry about the same work.
  at::parallel_for(0, tasks * splits, 1, [&](int64_t begin, int64_t end) {
    acc* S = scratch.data_ptr<acc>() + at::get_thread_num() * per_thread;
    acc* m = S + kBlockQ * kBlockK;
    acc* l = m + kBlockQ;
    KtPanels<acc> kt{l + kBlockQ, owners.data_ptr<int64_t>() + at::get_thread_num() * nkb, D, bk,
                     ldkt, pb.Tk};
    for (int64_t t = begin; t < end; ++t) {
      const int64_t split = t % splits, bq = t / splits;
      const int64_t bh = bq / nqb, r = bq % nqb;
      const int64_t qb = (r % 2 == 0) ? r / 2 : nqb - 1 - r / 2;
      const int64_t q0 = qb * kBlockQ, mq = std::min(kBlockQ, pb.Tq - q0);
      const int64_t row0 = bh * pb.Tq + q0;
      if (splits == 1) {
        acc* O = op + row0 * D;  // accumulate in the output itself
        forward_block(pb, qp, kp, vp, scale, drop, bh, q0, mq, 0, 1, bk, O, m, l, S, kt);
        for (int64_t i = 0; i < mq; ++i)
          finish_row(O + i * D, m[i], l[i], D, keep_scale, lp + row0 + i);
      } else {
        acc* O = part_o.data_ptr<acc>() + (split * pb.BH * pb.Tq + row0) * D;
        acc* pm = part_ml.data_ptr<acc>() + split * 2 * pb.BH * pb.Tq;
        forward_block(pb, qp, kp, vp, scale, drop, bh, q0, mq, split, splits, bk, O, m, l, S,
                      kt);
        std::copy(m, m + mq, pm + row0);
        std::copy(l, l + mq, pm + pb.BH * pb.Tq + row0);
      }
    }
  });
  if (splits == 1) return;
  combine_splits(part_o.const_data_ptr<acc>(), part_ml.const_data_ptr<acc>(), splits,
                 pb.BH * pb.Tq, D, keep_scale, op, lp);
}

// ---- backward -----------------------------------------------------------------------------------
//
// Every block product is a plain A·B (gemm::block_mm takes no transposes): the task of a key block
// computes the transposed blocks Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (rows: keys, columns: queries) from
// Qᵀ and dOᵀ, which each thread transposes once per batch·head. Then dV += Pᵀ·dO and
// dK += dSᵀ·Q read the blocks as they are, and dQ is accumulated transposed, dQᵀ += Kᵀ·dSᵀ, in a
// D x Tq buffer that is transposed into dq at the end.

// P = exp(S·scale - lse) and dS = P∘(dP - Δ) on one row of Sᵀ / dPᵀ (one key, queries 0..n),
// in place; lse and Δ per query. No dropout.
template <typename acc>
inline void softmax_grad_row(acc* prow, acc* drow, const acc* lse, const acc* delta, int64_t n,
                             acc scale) {
  using Vec = Vectorized<acc>;
  const Vec vs(scale);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec p = vexp(at::vec::fmsub(Vec::loadu(prow + i), vs, Vec::loadu(lse + i)));
    p.store(prow + i);
    (p * (Vec::loadu(drow + i) - Vec::loadu(delta + i))).store(drow + i);
  }
  for (; i < n; ++i) {
    prow[i] = std::exp(prow[i] * scale - lse[i]);
    drow[i] = prow[i] * (drow[i] - delta[i]);
  }
}

// As softmax_grad_row, with dropout: P = exp(S·scale - lse), then dS = P∘(dP∘Z - Δ) and P∘Z
// (for dV) in place of P, Z = keep(counter0 + i·stride) / (1 - p).
template <typename acc>
inline void softmax_grad_row_dropout(acc* prow, acc* drow, const acc* lse, const acc* delta,
                                     int64_t n, acc scale, const DropoutMask& drop,
                                     uint64_t counter0, uint64_t stride, acc keep_scale) {
  using Vec = Vectorized<acc>;
  const Vec vs(scale);
  alignas(64) acc z[DropoutMask::kChunk];
  for (int64_t c = 0; c < n; c += DropoutMask::kChunk) {
    const int64_t len = std::min(DropoutMask::kChunk, n - c);
    drop.factors(counter0 + static_cast<uint64_t>(c) * stride, stride, len, keep_scale, z);
    acc* pr = prow + c;
    acc* dr = drow + c;
    const acc* ls = lse + c;
    const acc* dl = delta + c;
    int64_t i = 0;
    for (; i + Vec::size() <= len; i += Vec::size()) {
      const Vec p = vexp(at::vec::fmsub(Vec::loadu(pr + i), vs, Vec::loadu(ls + i)));
      const Vec zi = Vec::loadu(z + i);
      (p * (Vec::loadu(dr + i) * zi - Vec::loadu(dl + i))).store(dr + i);
      (p * zi).store(pr + i);
    }
    for (; i < len; ++i) {
      const acc p = std::exp(pr[i] * scale - ls[i]);
      dr[i] = p * (dr[i] * z[i] - dl[i]);
      pr[i] = p * z[i];
    }
  }
}

template <typename acc>
void attention_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          double scale_d, bool causal, const DropoutMask& drop, at::Tensor& dq,
                          at::Tensor& dk, at::Tensor& dv) {
  const Problem pb{q.size(0) * q.size(1), q.size(2), k.size(2), q.size(3), causal,
                   k.size(2) - q.size(2)};
  const int64_t D = pb.D, Tq = pb.Tq, rows = pb.BH * Tq, nkb = (pb.Tk + kBwdK - 1) / kBwdK;
  const acc scale = static_cast<acc>(scale_d), keep_scale = static_cast<acc>(drop.keep_scale);
  const acc* dop = dout.const_data_ptr<acc>();
  const acc* qp = q.const_data_ptr<acc>();
  const acc* kp = k.const_data_ptr<acc>();
  const acc* vp = v.const_data_ptr<acc>();
  const acc* lp = lse.const_data_ptr<acc>();
  constexpr acc kInf = std::numeric_limits<acc>::infinity();

  // Δ_i = rowsum(dO ∘ O) = Σ_j P_ij·dP_ij (dropout included: O already carries the mask), and
  // the lse with -inf (a query that saw no key) replaced by +inf, so that its P = exp(s - lse)
  // comes out 0 instead of exp(+inf).
  at::Tensor delta = at::empty({rows}, q.options()), lse_safe = at::empty({rows}, q.options());
  {
    const acc* outp = out.const_data_ptr<acc>();
    acc* dp = delta.data_ptr<acc>();
    acc* ls = lse_safe.data_ptr<acc>();
    at::parallel_for(0, rows, row_grain(2 * D), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        dp[row] = dot(dop + row * D, outp + row * D, D);
        ls[row] = lp[row] == -kInf ? kInf : lp[row];
      }
    });
  }
  const acc* deltap = delta.const_data_ptr<acc>();
  const acc* lsp = lse_safe.const_data_ptr<acc>();

  const int64_t splits = splits_for(pb.BH, nkb);
  // ldq in steps of 256: it is part of the key of brgemm's kernel cache (see gemm.h), so a
  // leading dim that followed Tq in steps of 16 compiled new kernels for most sequence lengths.
  const int64_t ldq = (Tq + 255) / 256 * 256 + 16, ldk = padded_ld(kBwdK);
  // Per thread: Qᵀ and dOᵀ of its current batch·head (D x ldq each), dQᵀ (D x ldq; with splits,
  // per-split partials live in part_dq instead), Kᵀ of the key block (D x ldk), and the Sᵀ/Pᵀ and
  // dPᵀ/dSᵀ blocks (kBwdK x kBwdQ each).
  const int64_t nth = at::get_num_threads();
  const int64_t per_thread = 3 * D * ldq + D * ldk + 2 * kBwdK * kBwdQ;
  at::Tensor scratch = at::empty({nth, per_thread}, q.options());
  at::Tensor part_dq = splits == 1 ? at::Tensor() : at::zeros({splits, pb.BH, D, ldq}, q.options());
  acc* dkp = dk.data_ptr<acc>();
  acc* dvp = dv.data_ptr<acc>();
  acc* dqp = dq.data_ptr<acc>();

  at::parallel_for(0, pb.BH * splits, 1, [&](int64_t begin, int64_t end) {
    acc* Qt = scratch.data_ptr<acc>() + at::get_thread_num() * per_thread;
    acc* dOt = Qt + D * ldq;
    acc* dQt_own = dOt + D * ldq;
    acc* Kt = dQt_own + D * ldq;
    acc* Pt = Kt + D * ldk;
    acc* dSt = Pt + kBwdK * kBwdQ;
    int64_t held = -1;  // the batch·head whose Qᵀ, dOᵀ are in Qt, dOt
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / splits, split = t % splits;
      const acc* Q = qp + bh * Tq * D;
      const acc* dO = dop + bh * Tq * D;
      if (held != bh) {
        transpose(Q, Tq, D, D, Qt, ldq);
        transpose(dO, Tq, D, D, dOt, ldq);
        held = bh;
      }
      acc* dQt = splits == 1 ? dQt_own : part_dq.data_ptr<acc>() + (split * pb.BH + bh) * D * ldq;
      if (splits == 1) std::fill(dQt, dQt + D * ldq, acc(0));
      const acc* lse_bh = lsp + bh * Tq;
      const acc* delta_bh = deltap + bh * Tq;
      // Key blocks split, split + splits, ...: interleaved, so that with causal masking (early
      // key blocks are seen by more queries) the splits carry similar work.
      for (int64_t kb = split; kb < nkb; kb += splits) {
        const int64_t k0 = kb * kBwdK, mk = std::min(kBwdK, pb.Tk - k0);
        const acc* K = kp + (bh * pb.Tk + k0) * D;
        const acc* V = vp + (bh * pb.Tk + k0) * D;
        acc* dK = dkp + (bh * pb.Tk + k0) * D;
        acc* dV = dvp + (bh * pb.Tk + k0) * D;
        std::fill(dK, dK + mk * D, acc(0));
        std::fill(dV, dV + mk * D, acc(0));
        transpose(K, mk, D, D, Kt, ldk);
        // The first query that sees key k0 (all of them without causal masking).
        const int64_t qstart = causal ? std::clamp<int64_t>(k0 - pb.off, 0, Tq) : 0;
        for (int64_t q0 = qstart; q0 < Tq; q0 += kBwdQ) {
          const int64_t mq = std::min(kBwdQ, Tq - q0);
          mm(mk, mq, D, K, D, Qt + q0, ldq, Pt, kBwdQ, false);    // Sᵀ = K·Qᵀ
          mm(mk, mq, D, V, D, dOt + q0, ldq, dSt, kBwdQ, false);  // dPᵀ = V·dOᵀ
          for (int64_t j = 0; j < mk; ++j) {
            acc* prow = Pt + j * kBwdQ;
            acc* drow = dSt + j * kBwdQ;
            // Key k0 + j is visible to queries q0 + i with i >= c0 (all of them if not causal).
            const int64_t c0 = causal ? std::clamp<int64_t>(k0 + j - pb.off - q0, 0, mq) : 0;
            std::fill(prow, prow + c0, acc(0));
            std::fill(drow, drow + c0, acc(0));
            if (!drop.on) {
              softmax_grad_row(prow + c0, drow + c0, lse_bh + q0 + c0, delta_bh + q0 + c0,
                               mq - c0, scale);
              continue;
            }
            // dS = P∘(dP∘Z - Δ) and P∘Z for dV, Z = keep/(1-p): the forward's mask again
            // (query qi's counter for this key is (bh·Tq + qi)·Tk + k0 + j: stride Tk).
            const uint64_t counter0 = static_cast<uint64_t>((bh * Tq + q0 + c0) * pb.Tk + k0 + j);
            softmax_grad_row_dropout(prow + c0, drow + c0, lse_bh + q0 + c0, delta_bh + q0 + c0,
                                     mq - c0, scale, drop, counter0,
                                     static_cast<uint64_t>(pb.Tk), keep_scale);
          }
          const int64_t row0 = bh * Tq + q0;
          mm(mk, D, mq, Pt, kBwdQ, dop + row0 * D, D, dV, D, true);  // dV += (P∘Z)ᵀ·dO
          mm(mk, D, mq, dSt, kBwdQ, qp + row0 * D, D, dK, D, true);  // dK += dSᵀ·Q
          mm(D, mq, mk, Kt, ldk, dSt, kBwdQ, dQt + q0, ldq, true);   // dQᵀ += Kᵀ·dSᵀ
        }
        scale_row(dK, mk * D, scale);
      }
      if (splits == 1) {
        acc* dQ = dqp + bh * Tq * D;
        transpose(dQt, D, Tq, ldq, dQ, D);
        scale_row(dQ, Tq * D, scale);
      }
    }
  });
  if (splits == 1) return;

  // dQ = scale · (Σ_splits partial dQᵀ)ᵀ, summed in split order into the first partial.
  at::parallel_for(0, pb.BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      acc* sum = part_dq.data_ptr<acc>() + bh * D * ldq;
      for (int64_t s = 1; s < splits; ++s) {
        const acc* ps = part_dq.const_data_ptr<acc>() + (s * pb.BH + bh) * D * ldq;
        for (int64_t x = 0; x < D * ldq; ++x) sum[x] += ps[x];
      }
      acc* dQ = dqp + bh * Tq * D;
      transpose(sum, D, Tq, ldq, dQ, D);
      scale_row(dQ, Tq * D, scale);
    }
  });
}

// ---- entry points -------------------------------------------------------------------------------

constexpr const char* kFwd = "attention_fwd";
constexpr const char* kBwd = "attention_bwd";

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  check_cpu_float(q, op, "q");
  check_cpu_float(k, op, "k");
  check_cpu_float(v, op, "v");
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, Tq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, op, ": k and v must be 4-D (B, H, Tk, D), got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k has shape ", k.sizes(), " but v has shape ",
              v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": k of shape ", k.sizes(), " does not match q of shape ", q.sizes(),
              " in B, H or D");
  TORCH_CHECK(q.size(3) > 0, op, ": head dim D must be positive");
}

void check_args(double dropout_p, const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
}

// The dropout seed: a one-element int64 CPU tensor, so that drawing it is part of a traced graph
// (torch.compile) instead of a Python int read with .item(). Needed only when dropout_p > 0.
int64_t seed_value(const std::optional<at::Tensor>& seed, double dropout_p, const char* op) {
  if (!seed.has_value()) {
    TORCH_CHECK(dropout_p == 0.0, op, ": dropout_p > 0 needs a seed tensor");
    return 0;
  }
  TORCH_CHECK(seed->device().is_cpu() && seed->scalar_type() == at::kLong && seed->numel() == 1,
              op, ": seed must be a one-element int64 CPU tensor, got ", seed->scalar_type(),
              " of shape ", seed->sizes(), " on ", seed->device());
  return seed->item<int64_t>();
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, double scale,
                                                 bool is_causal, double dropout_p,
                                                 const std::optional<at::Tensor>& seed,
                                                 int64_t offset) {
  check_qkv(q, k, v, kFwd);
  check_args(dropout_p, kFwd);
  const int64_t seed_v = seed_value(seed, dropout_p, kFwd);
  const auto dt = q.scalar_type();
  const bool reduced = dt == at::kBFloat16 || dt == at::kHalf;
  const auto acc_t = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor qa = q.to(acc_t);  // no copy for fp32/fp64
  at::Tensor out = empty_output(q.sizes(), q.options().dtype(acc_t));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc_t));
  const DropoutMask drop(dropout_p, seed_v, offset);
  if (q.numel() > 0 && k.size(2) > 0) {
    // A few query rows (a decode step): the decode path, which reads K and V as they are.
    if (q.size(2) <= kDecodeRows) {
      if (dt == at::kDouble) {
        attention_decode_kernel<double, double>(qa, k, v, scale, is_causal, drop, out, lse);
      } else if (dt == at::kBFloat16) {
        attention_decode_kernel<float, c10::BFloat16>(qa, k, v, scale, is_causal, drop, out, lse);
      } else if (dt == at::kHalf) {
        attention_decode_kernel<float, c10::Half>(qa, k, v, scale, is_causal, drop, out, lse);
      } else {
        attention_decode_kernel<float, float>(qa, k, v, scale, is_causal, drop, out, lse);
      }
    } else {
      at::Tensor ka = k.to(acc_t), va = v.to(acc_t);
      if (acc_t == at::kDouble) {
        attention_fwd_kernel<double>(qa, ka, va, scale, is_causal, drop, out, lse);
      } else {
        attention_fwd_kernel<float>(qa, ka, va, scale, is_causal, drop, out, lse);
      }
    }
  } else {
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
  }
  return {reduced ? out.to(dt) : out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale, bool is_causal, double dropout_p,
    const std::optional<at::Tensor>& seed, int64_t offset) {
  check_qkv(q, k, v, kBwd);
  check_args(dropout_p, kBwd);
  const int64_t seed_v = seed_value(seed, dropout_p, kBwd);
  check_cpu_float(dout, kBwd, "dout");
  check_cpu_float(out, kBwd, "out");
  check_same(q, dout, kBwd, "q", "dout");
  check_same(q, out, kBwd, "q", "out");
  const auto dt = q.scalar_type();
  const bool reduced = dt == at::kBFloat16 || dt == at::kHalf;
  const auto acc_t = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == acc_t && lse.is_contiguous(), kBwd,
              ": lse must be a contiguous CPU ", acc_t, " tensor, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              kBwd, ": lse must have shape (B, H, Tq) = ", q.sizes().slice(0, 3), ", got ",
              lse.sizes());
  at::Tensor qa = q.to(acc_t), ka = k.to(acc_t), va = v.to(acc_t);
  at::Tensor doa = dout.to(acc_t), oa = out.to(acc_t);
  auto opts = q.options().dtype(acc_t);
  at::Tensor dq = empty_output(q.sizes(), opts), dk = empty_output(k.sizes(), opts),
             dv = empty_output(v.sizes(), opts);
  const DropoutMask drop(dropout_p, seed_v, offset);
  if (q.numel() > 0 && k.numel() > 0) {
    if (acc_t == at::kDouble) {
      attention_bwd_kernel<double>(doa, qa, ka, va, oa, lse, scale, is_causal, drop, dq, dk, dv);
    } else {
      attention_bwd_kernel<float>(doa, qa, ka, va, oa, lse, scale, is_causal, drop, dq, dk, dv);
    }
  } else {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  if (reduced) return {dq.to(dt), dk.to(dt), dv.to(dt)};
  return {dq, dk, dv};
}

void register_attention(torch::Library& m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace

static const OpRegistrar registrar(&register_attention);

}  // namespace fastgpt
