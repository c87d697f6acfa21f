// CPU kernels of the vector-quantisation op family: nearest code (l2 / cosine) and per-code statistics.
// The contract is vlm_kernels/reference/vq.py's.
//
// Nearest code. The rows are cut into blocks of kRowBlock; at::parallel_for hands blocks to threads.
// A thread gathers its block's rows (strided for channel-first x: no transposed copy of x is made),
// centres them on the codebook mean (l2; distances are translation invariant, and centring keeps the
// expanded form from cancelling on data far from the origin) and walks the prepared codebook in tiles
// of kCodeTile codes: one single-threaded GEMM per tile into a kRowBlock x kCodeTile buffer that stays
// in L2, then a scan of the tile that keeps, per row, the running minimum of the approximate score
//     l2: |e_c|^2 - 2 x_c.e_c        cosine: -x.e_hat
// (the row's own |x_c|^2 is the same for every code) and every code whose score is within `tol` of
// it. `tol` is twice a rigorous bound on the score's rounding error (any summation order:
// |fl(x.e) - x.e| <= D u sum|x_d e_d|, plus the centring and norm roundings), so the true nearest code
// is always kept. The kept candidates are re-scored exactly in float64 from the original values and
// the best (lowest index on ties) wins. A row with more than kMaxCandidates codes within `tol` (a
// codebook of near-duplicates) falls back to an exact scan of the whole codebook. Exact duplicate codes
// are dropped up front: the lowest index of a set of equal rows is the only one that can win.
// Where the CPU has AVX512-BF16 the float32 tiles are bf16 GEMMs (twice the rate): the rounding bound
// grows by 3 x 2^-8 |x_c| max|e_c|, which only widens the candidate window, and the rows whose window
// overflows are redone with float32 tiles before the exact re-score (use_bf16_tiles below).
// No N x K matrix exists at any time: extra memory is the prepared codebook (K x D in float32, plus a
// bf16 copy) and kRowBlock x (D + kCodeTile) per thread.
//
// Code statistics. counts by one sequential pass over the indices; sums accumulated in float64, rows
// in increasing order, threads splitting the D columns (so no two threads touch the same accumulator
// and the result does not depend on the thread count).
#include "cpu/isa.h"
#include "cpu/vq.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <unordered_map>
#include <vector>

#if VLM_CPU_X86
#include <immintrin.h>
#endif

#ifndef VLM_CPU_INCLUDES_ONLY  // (a level wrapper's first pass takes the headers only, see isa.h)
#if defined(__AVX512F__) || defined(VLM_VQ_ISA_AVX512)
#define VLM_VQ_AVX512 1
#else
#define VLM_VQ_AVX512 0
#endif

namespace vlm {
namespace VLM_CPU_LEVEL {
namespace {

constexpr int64_t kRowBlock = 256;     // rows per GEMM block
constexpr int64_t kCodeTile = 1024;    // codes per GEMM tile: 256 x 1024 fp32 scores = 1 MB
constexpr int kMaxCandidates = 32;     // codes kept per row for the exact re-score
constexpr double kCosineEps = 1e-12;   // F.normalize's eps

// The (outer, D, inner) view of x: row r = o * inner + i has element d at base(r) + d * inner.
struct Rows {
  int64_t outer = 1, D = 1, inner = 1;
  int64_t count() const { return outer * inner; }
  int64_t base(int64_t r) const {
    const int64_t o = r / inner;
    return o * D * inner + (r - o * inner);
  }
};

Rows rows_of(const at::Tensor& x, int64_t dim) {
  Rows v;
  v.D = x.size(dim);
  for (int64_t d = 0; d < dim; ++d) v.outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) v.inner *= x.size(d);
  return v;
}

std::vector<int64_t> sizes_without(const at::Tensor& t, int64_t dim) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s.erase(s.begin() + dim);
  return s;
}

template <typename T>
inline double to_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
inline double to_double<double>(double v) {
  return v;
}

// Unit roundoff of the tile type.
template <typename acc_t>
constexpr double unit_roundoff() {
  return std::is_same<acc_t, double>::value ? 0x1p-53 : 0x1p-24;
}

enum class Metric { L2, Cosine };

// The codebook as the tiles see it, prepared once per call.
template <typename acc_t>
struct Codebook {
  int64_t K = 0, D = 0;
  at::Tensor codes;              // (K, D) acc_t: centred (l2) or normalised (cosine); zero rows for skipped codes
  std::vector<acc_t> penalty;    // |e_c|^2 (l2) or 0 (cosine); +inf for skipped codes
  std::vector<uint8_t> usable;   // finite and not a duplicate of an earlier code
  std::vector<double> center;    // (D,) the mean of the finite codes (l2), zeros (cosine)
  std::vector<double> norm;      // (K,) float64 norm of each original code (cosine re-score)
  double max_norm = 0.0;         // max |codes_k| over usable codes
  bool any_finite = false;
};

// Marks codes that equal, bit for bit, an earlier code (they can never be the lowest-index minimum).
template <typename scalar_t>
std::vector<uint8_t> duplicate_codes(const scalar_t* e, int64_t K, int64_t D) {
  std::vector<uint8_t> dup(K, 0);
  std::unordered_map<uint64_t, int64_t> first;
  first.reserve(static_cast<size_t>(K) * 2);
  const size_t bytes = static_cast<size_t>(D) * sizeof(scalar_t);
  for (int64_t k = 0; k < K; ++k) {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(e + k * D);
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (size_t b = 0; b < bytes; ++b) h = (h ^ p[b]) * 1099511628211ull;
    auto it = first.find(h);
    if (it == first.end()) {
      first.emplace(h, k);
    } else if (std::memcmp(p, e + it->second * D, bytes) == 0) {
      dup[k] = 1;
    }
  }
  return dup;
}

template <typename scalar_t, typename acc_t>
Codebook<acc_t> prepare_codebook(const at::Tensor& codebook, Metric metric) {
  Codebook<acc_t> cb;
  cb.K = codebook.size(0);
  cb.D = codebook.size(1);
  const int64_t K = cb.K, D = cb.D;
  const scalar_t* e = codebook.const_data_ptr<scalar_t>();
  cb.usable = duplicate_codes(e, K, D);
  for (auto& u : cb.usable) u = !u;  // usable = not a duplicate (finiteness below)
  std::vector<uint8_t> finite(K, 1);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t d = 0; d < D; ++d) {
      if (!std::isfinite(to_double(e[k * D + d]))) {
        finite[k] = 0;
        break;
      }
    }
    cb.any_finite = cb.any_finite || finite[k];
    cb.usable[k] = cb.usable[k] && finite[k];
  }
  cb.center.assign(D, 0.0);
  if (metric == Metric::L2) {
    int64_t n = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (!finite[k]) continue;
      ++n;
      for (int64_t d = 0; d < D; ++d) cb.center[d] += to_double(e[k * D + d]);
    }
    for (auto& c : cb.center) c /= static_cast<double>(std::max<int64_t>(n, 1));
  }
  cb.codes = at::empty({K, D}, codebook.options().dtype(std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat));
  acc_t* codes = cb.codes.template mutable_data_ptr<acc_t>();
  cb.penalty.assign(K, std::numeric_limits<acc_t>::infinity());
  cb.norm.assign(K, 0.0);
  std::vector<double> norms(K, 0.0);
  at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* out = codes + k * D;
      double sq = 0.0;
      for (int64_t d = 0; d < D; ++d) sq += to_double(e[k * D + d]) * to_double(e[k * D + d]);
      cb.norm[k] = std::sqrt(sq);
      if (!cb.usable[k]) {
        std::fill(out, out + D, acc_t(0));
        continue;
      }
      const double scale = metric == Metric::Cosine ? 1.0 / std::max(cb.norm[k], kCosineEps) : 1.0;
      double n2 = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        out[d] = static_cast<acc_t>((to_double(e[k * D + d]) - cb.center[d]) * scale);
        n2 += static_cast<double>(out[d]) * static_cast<double>(out[d]);
      }
      norms[k] = std::sqrt(n2);
      cb.penalty[k] = metric == Metric::L2 ? static_cast<acc_t>(n2) : acc_t(0);
    }
  });
  for (int64_t k = 0; k < K; ++k)
    if (cb.usable[k]) cb.max_norm = std::max(cb.max_norm, norms[k]);
  return cb;
}

// Per-row state of the running minimum and its candidates.
template <typename acc_t>
struct RowState {
  acc_t best;
  acc_t tol;
  int count;
  bool overflow;
  int64_t index[kMaxCandidates];
  acc_t score[kMaxCandidates];

  void reset(acc_t tolerance) {
    best = std::numeric_limits<acc_t>::infinity();
    tol = tolerance;
    count = 0;
    overflow = !std::isfinite(static_cast<double>(tolerance));
  }

  void push(acc_t s, int64_t k) {
    if (count == kMaxCandidates) {  // drop what the lowered minimum has ruled out since
      int kept = 0;
      const acc_t limit = best + tol;
      for (int c = 0; c < count; ++c) {
        if (score[c] <= limit) {
          score[kept] = score[c];
          index[kept] = index[c];
          ++kept;
        }
      }
      count = kept;
      if (count == kMaxCandidates) {
        overflow = true;
        return;
      }
    }
    score[count] = s;
    index[count] = k;
    ++count;
  }
};

// Scans one row of a score tile: s[j] ~ x_c . codes[k0 + j], score = penalty - factor * s (in acc_t).
template <typename acc_t, typename tile_t>
void scan_tile_row_generic(const tile_t* s, const acc_t* penalty, int64_t kb, int64_t k0, acc_t factor,
                           RowState<acc_t>& st) {
  constexpr int64_t W = 16;
  acc_t chunk[W];
  for (int64_t j0 = 0; j0 < kb; j0 += W) {
    const int64_t w = std::min(W, kb - j0);
    acc_t lo = std::numeric_limits<acc_t>::infinity();
    for (int64_t l = 0; l < w; ++l) {
      chunk[l] = penalty[j0 + l] - factor * static_cast<acc_t>(s[j0 + l]);
      lo = chunk[l] < lo ? chunk[l] : lo;
    }
    if (lo < st.best) st.best = lo;
    const acc_t limit = st.best + st.tol;
    if (!(lo <= limit) || st.overflow) continue;
    for (int64_t l = 0; l < w; ++l)
      if (chunk[l] <= limit) st.push(chunk[l], k0 + j0 + l);
  }
}

template <typename acc_t, typename tile_t>
void scan_tile_row(const tile_t* s, const acc_t* penalty, int64_t kb, int64_t k0, acc_t factor, RowState<acc_t>& st) {
  scan_tile_row_generic(s, penalty, kb, k0, factor, st);
}

#if VLM_VQ_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename tile_t>
void scan_tile_row_avx512(const tile_t* s, const float* penalty, int64_t kb, int64_t k0, float factor,
                          RowState<float>& st) {
  const __m512 f = _mm512_set1_ps(factor);
  int64_t j0 = 0;
  for (; j0 + 16 <= kb; j0 += 16) {
    // score = penalty - factor * s, one rounding per operation (no FMA), as the error bound assumes.
    const __m512 score = _mm512_sub_ps(_mm512_loadu_ps(penalty + j0), _mm512_mul_ps(f, load16(s + j0)));
    const float lo = _mm512_reduce_min_ps(score);
    if (lo < st.best) st.best = lo;
    const float limit = st.best + st.tol;
    if (!(lo <= limit) || st.overflow) continue;
    __mmask16 m = _mm512_cmp_ps_mask(score, _mm512_set1_ps(limit), _CMP_LE_OQ);
    alignas(64) float v[16];
    _mm512_store_ps(v, score);
    while (m) {
      const int l = __builtin_ctz(m);
      m &= m - 1;
      st.push(v[l], k0 + j0 + l);
    }
  }
  if (j0 < kb) scan_tile_row_generic<float, tile_t>(s + j0, penalty + j0, kb - j0, k0 + j0, factor, st);
}

template <>
void scan_tile_row<float, float>(const float* s, const float* penalty, int64_t kb, int64_t k0, float factor,
                                 RowState<float>& st) {
  scan_tile_row_avx512(s, penalty, kb, k0, factor, st);
}

template <>
void scan_tile_row<float, c10::BFloat16>(const c10::BFloat16* s, const float* penalty, int64_t kb, int64_t k0,
                                         float factor, RowState<float>& st) {
  scan_tile_row_avx512(s, penalty, kb, k0, factor, st);
}
#endif

// Which GEMM precision the float32 tiles use. bf16 tiles (inputs rounded to bfloat16, float32
// accumulation, bfloat16 scores) run twice as fast where the CPU has AVX512-BF16; their larger error
// only widens the candidate window, and the rows whose window holds too many codes are redone with
// float32 tiles, so the answer is the same. VLM_KERNELS_VQ_CPU_TILES=fp32|bf16 overrides the choice.
bool use_bf16_tiles() {
  const char* env = std::getenv("VLM_KERNELS_VQ_CPU_TILES");
  if (env != nullptr && std::strcmp(env, "fp32") == 0) return false;
  if (env != nullptr && std::strcmp(env, "bf16") == 0) return true;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  // AVX512-BF16 only at the AVX-512 level: a lower level (forced by VLM_KERNELS_CPU_ISA) behaves as a
  // CPU of that level would, which has no bf16 dot instructions
  static const bool native = __builtin_cpu_supports("avx512bf16");
  return native && VLM_VQ_AVX512;
#else
  return false;
#endif
}

// Exact float64 scores of one row against code k (from the original values).
template <typename scalar_t>
double exact_l2(const double* xr, const scalar_t* e, int64_t D) {
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    const double t0 = xr[d] - to_double(e[d]), t1 = xr[d + 1] - to_double(e[d + 1]);
    const double t2 = xr[d + 2] - to_double(e[d + 2]), t3 = xr[d + 3] - to_double(e[d + 3]);
    a0 += t0 * t0;
    a1 += t1 * t1;
    a2 += t2 * t2;
    a3 += t3 * t3;
  }
  for (; d < D; ++d) {
    const double t = xr[d] - to_double(e[d]);
    a0 += t * t;
  }
  return (a0 + a1) + (a2 + a3);
}

template <typename scalar_t>
double exact_dot(const double* xr, const scalar_t* e, int64_t D) {
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    a0 += xr[d] * to_double(e[d]);
    a1 += xr[d + 1] * to_double(e[d + 1]);
    a2 += xr[d + 2] * to_double(e[d + 2]);
    a3 += xr[d + 3] * to_double(e[d + 3]);
  }
  for (; d < D; ++d) a0 += xr[d] * to_double(e[d]);
  return (a0 + a1) + (a2 + a3);
}


// One block of rows: their centred rows (acc_t, row-major, D columns), the tiles' GEMM and scans.
template <typename acc_t, typename tile_t>
void scan_block(const tile_t* rows, int64_t mb, const at::Tensor& codes, const std::vector<acc_t>& penalty,
                acc_t factor, const std::vector<uint8_t>& skip, std::vector<tile_t>& tile,
                std::vector<RowState<acc_t>>& state) {
  const int64_t K = codes.size(0), D = codes.size(1);
  const at::Tensor a = at::from_blob(const_cast<tile_t*>(rows), {mb, D}, codes.options());
  for (int64_t k0 = 0; k0 < K; k0 += kCodeTile) {
    const int64_t kb = std::min(kCodeTile, K - k0);
    at::Tensor scores = at::from_blob(tile.data(), {mb, kb}, codes.options());
    at::mm_out(scores, a, codes.narrow(0, k0, kb).t());
    for (int64_t i = 0; i < mb; ++i)
      if (!skip[i]) scan_tile_row<acc_t, tile_t>(tile.data() + i * kb, penalty.data() + k0, kb, k0, factor, state[i]);
  }
}

template <typename scalar_t, typename acc_t>
void nearest_impl(const at::Tensor& x, const at::Tensor& codebook, const Rows& rv, Metric metric, int64_t* out_index,
                  float* out_dist) {
  const Codebook<acc_t> cb = prepare_codebook<scalar_t, acc_t>(codebook, metric);
  const int64_t N = rv.count(), D = rv.D, K = cb.K;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* ep = codebook.const_data_ptr<scalar_t>();
  const acc_t factor = metric == Metric::L2 ? acc_t(2) : acc_t(1);
  const double u = unit_roundoff<acc_t>();
  // bf16 tiles: inputs rounded (2 x 2^-8 relative per product), float32 sums, the score rounded to
  // bf16 (2^-8 of |x_c . e_c|): |error of x_c . e_c| <= (3 * 2^-8 + (D + 8) 2^-24) |x_c| |e_c|.
  const bool bf16 = std::is_same<acc_t, float>::value && use_bf16_tiles();
  const double gamma_bf16 = 3 * 0x1p-8 + (D + 8) * 0x1p-24;
  const at::Tensor codes_bf16 = bf16 ? cb.codes.to(at::kBFloat16) : at::Tensor();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;

  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> xc(static_cast<size_t>(kRowBlock) * D);
    std::vector<acc_t> tile(static_cast<size_t>(kRowBlock) * std::min(kCodeTile, K));
    std::vector<c10::BFloat16> xc16(bf16 ? static_cast<size_t>(kRowBlock) * D : 0);
    std::vector<c10::BFloat16> tile16(bf16 ? static_cast<size_t>(kRowBlock) * std::min(kCodeTile, K) : 0);
    std::vector<RowState<acc_t>> state(kRowBlock), redo_state;
    std::vector<uint8_t> bad(kRowBlock), none;
    std::vector<double> norm(kRowBlock);
    std::vector<int64_t> redo;
    std::vector<double> xr(D);
    // Twice the bound on |score error| of a row of norm xn with tiles of type T (see the file header):
    // (D + 8) u covers a float32/float64 dot product in any order plus the centring, norm and score
    // roundings; bf16 tiles add gamma_bf16 |x_c| max|e_c| per product.
    auto tolerance = [&](double xn, bool with_bf16) {
      const double m = cb.max_norm;
      double bound = metric == Metric::L2 ? (D + 8) * u * (xn + m) * (xn + m) : (D + 8) * u * xn * (m + 1.0);
      if (with_bf16) bound += double(factor) * gamma_bf16 * xn * m;
      return static_cast<acc_t>(2.0 * bound);
    };
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, mb = std::min(kRowBlock, N - r0);
      // Gather, centre, check finiteness.
      for (int64_t i = 0; i < mb; ++i) {
        const int64_t base = rv.base(r0 + i);
        acc_t* row = xc.data() + i * D;
        double n2 = 0.0;
        bool finite = true;
        for (int64_t d = 0; d < D; ++d) {
          const double v = to_double(xp[base + d * rv.inner]);
          finite = finite && std::isfinite(v);
          row[d] = static_cast<acc_t>(v - cb.center[d]);
          n2 += static_cast<double>(row[d]) * static_cast<double>(row[d]);
        }
        bad[i] = !finite || !cb.any_finite;
        if (bad[i]) std::fill(row, row + D, acc_t(0));
        norm[i] = bad[i] ? 0.0 : std::sqrt(n2);
        state[i].reset(tolerance(norm[i], bf16));
      }
      if (bf16) {
        for (int64_t j = 0; j < mb * D; ++j) xc16[j] = c10::BFloat16(static_cast<float>(xc[j]));
        scan_block<acc_t, c10::BFloat16>(xc16.data(), mb, codes_bf16, cb.penalty, factor, bad, tile16, state);
        // Rows whose bf16 window held too many codes: once more with float32 tiles.
        redo.clear();
        for (int64_t i = 0; i < mb; ++i)
          if (!bad[i] && state[i].overflow) redo.push_back(i);
        if (!redo.empty()) {
          const int64_t nr = static_cast<int64_t>(redo.size());
          std::vector<acc_t> sub(static_cast<size_t>(nr) * D);
          redo_state.resize(nr);
          none.assign(nr, 0);
          for (int64_t j = 0; j < nr; ++j) {
            std::copy(xc.data() + redo[j] * D, xc.data() + (redo[j] + 1) * D, sub.data() + j * D);
            redo_state[j].reset(tolerance(norm[redo[j]], false));
          }
          scan_block<acc_t, acc_t>(sub.data(), nr, cb.codes, cb.penalty, factor, none, tile, redo_state);
          for (int64_t j = 0; j < nr; ++j) state[redo[j]] = redo_state[j];
        }
      } else {
        scan_block<acc_t, acc_t>(xc.data(), mb, cb.codes, cb.penalty, factor, bad, tile, state);
      }
      // Exact re-score of the candidates (or of every usable code after an overflow).
      for (int64_t i = 0; i < mb; ++i) {
        const int64_t r = r0 + i;
        if (bad[i]) {
          out_index[r] = 0;
          out_dist[r] = static_cast<float>(nan);
          continue;
        }
        const int64_t base = rv.base(r);
        for (int64_t d = 0; d < D; ++d) xr[d] = to_double(xp[base + d * rv.inner]);
        double xnorm = 0.0;
        if (metric == Metric::Cosine) xnorm = std::max(std::sqrt(exact_dot(xr.data(), xr.data(), D)), kCosineEps);
        const RowState<acc_t>& st = state[i];
        int64_t best_k = -1;
        double best = std::numeric_limits<double>::infinity();
        auto consider = [&](int64_t k) {
          if (!cb.usable[k]) return;
          double v;
          if (metric == Metric::L2) {
            v = exact_l2(xr.data(), ep + k * D, D);
          } else {
            v = -exact_dot(xr.data(), ep + k * D, D) / (xnorm * std::max(cb.norm[k], kCosineEps));
          }
          if (best_k < 0 || v < best || (v == best && k < best_k)) {
            best = v;
            best_k = k;
          }
        };
        if (st.overflow) {
          for (int64_t k = 0; k < K; ++k) consider(k);
        } else {
          const acc_t limit = st.best + st.tol;
          for (int c = 0; c < st.count; ++c)
            if (st.score[c] <= limit) consider(st.index[c]);
        }
        if (best_k < 0) {  // cannot happen with a finite row and a usable code; kept as a guard
          out_index[r] = 0;
          out_dist[r] = static_cast<float>(nan);
          continue;
        }
        out_index[r] = best_k;
        out_dist[r] = static_cast<float>(metric == Metric::L2 ? best : 1.0 + best);
      }
    }
  });
}

void check_cpu_tensor(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous");
}

void check_float(const at::Tensor& t, const char* fn, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, fn, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", st, " with shape ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> vq_nearest_cpu(const at::Tensor& x, const at::Tensor& codebook, int64_t dim,
                                                  std::string_view metric) {
  constexpr const char* fn = "vq_nearest_cpu";
  check_cpu_tensor(x, fn, "x");
  check_cpu_tensor(codebook, fn, "codebook");
  check_float(x, fn, "x");
  TORCH_CHECK(dim >= 0 && dim < x.dim(), fn, ": dim=", dim, " is out of range for x with shape ", x.sizes());
  TORCH_CHECK(codebook.dim() == 2 && codebook.size(0) > 0 && codebook.size(1) == x.size(dim), fn,
              ": codebook must be (K > 0, D = ", x.size(dim), "), got shape ", codebook.sizes());
  TORCH_CHECK(codebook.scalar_type() == x.scalar_type(), fn, ": codebook dtype ", codebook.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(metric == "l2" || metric == "cosine", fn, ": metric must be \"l2\" or \"cosine\", got \"",
              std::string(metric), "\"");
  TORCH_CHECK(x.size(dim) > 0, fn, ": x has D = 0 along dim ", dim);
  const auto out_shape = sizes_without(x, dim);
  at::Tensor indices = at::empty(out_shape, x.options().dtype(at::kLong));
  at::Tensor distances = at::empty(out_shape, x.options().dtype(at::kFloat));
  if (indices.numel() == 0) return {indices, distances};
  const Rows rv = rows_of(x, dim);
  const Metric m = metric == "l2" ? Metric::L2 : Metric::Cosine;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn, [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    nearest_impl<scalar_t, acc_t>(x, codebook, rv, m, indices.mutable_data_ptr<int64_t>(),
                                  distances.mutable_data_ptr<float>());
  });
  return {indices, distances};
}

std::tuple<at::Tensor, at::Tensor> vq_code_stats_cpu(const at::Tensor& x, const at::Tensor& indices, int64_t num_codes,
                                                     int64_t dim) {
  constexpr const char* fn = "vq_code_stats_cpu";
  check_cpu_tensor(x, fn, "x");
  check_cpu_tensor(indices, fn, "indices");
  check_float(x, fn, "x");
  TORCH_CHECK(dim >= 0 && dim < x.dim(), fn, ": dim=", dim, " is out of range for x with shape ", x.sizes());
  TORCH_CHECK(num_codes > 0, fn, ": num_codes must be > 0, got ", num_codes);
  TORCH_CHECK(indices.scalar_type() == at::kLong, fn, ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.sizes() == at::IntArrayRef(sizes_without(x, dim)), fn, ": indices must have x's shape ",
              x.sizes(), " without dim ", dim, ", got ", indices.sizes());
  const Rows rv = rows_of(x, dim);
  const int64_t N = rv.count(), D = rv.D, K = num_codes;
  const auto out_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r)
    TORCH_CHECK(idx[r] >= 0 && idx[r] < K, fn, ": indices[", r, "] = ", idx[r], " is outside [0, ", K, ")");
  at::Tensor counts = at::zeros({K}, x.options().dtype(out_type));
  at::Tensor acc = at::zeros({K, D}, x.options().dtype(at::kDouble));
  double* a = acc.mutable_data_ptr<double>();
  {
    std::vector<int64_t> c(K, 0);
    for (int64_t r = 0; r < N; ++r) ++c[idx[r]];
    AT_DISPATCH_FLOATING_TYPES(out_type, fn, [&] {
      scalar_t* cp = counts.mutable_data_ptr<scalar_t>();
      for (int64_t k = 0; k < K; ++k) cp[k] = static_cast<scalar_t>(c[k]);
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), fn, [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // Threads own column ranges: every accumulator is written by one thread, rows in order.
    const int64_t grain = std::max<int64_t>(16, (D + at::get_num_threads() - 1) / at::get_num_threads());
    at::parallel_for(0, D, grain, [&](int64_t d0, int64_t d1) {
      for (int64_t r = 0; r < N; ++r) {
        const int64_t base = rv.base(r);
        double* dst = a + idx[r] * D;
        for (int64_t d = d0; d < d1; ++d) dst[d] += to_double(xp[base + d * rv.inner]);
      }
    });
  });
  return {counts, out_type == at::kDouble ? acc : acc.to(out_type)};
}

}  // namespace VLM_CPU_LEVEL
}  // namespace vlm

// Schemas here, kernels for the CPU dispatch key.
#undef VLM_VQ_AVX512

#if VLM_CPU_BASE_BUILD  // the ops are registered once, with the entry points of the level chosen at load
#define VLM_CPU_HEADER "cpu/vq.h"
#include "cpu/other_levels.h"

TORCH_LIBRARY_FRAGMENT(vlm_kernels_C, m) {
  m.def("vq_nearest_cpu(Tensor x, Tensor codebook, int dim, str metric) -> (Tensor, Tensor)");
  m.def("vq_code_stats_cpu(Tensor x, Tensor indices, int num_codes, int dim) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vlm_kernels_C, CPU, m) {
  m.impl("vq_nearest_cpu", VLM_CPU_PICK(vq_nearest_cpu));
  m.impl("vq_code_stats_cpu", VLM_CPU_PICK(vq_code_stats_cpu));
}
#endif  // VLM_CPU_BASE_BUILD
#endif  // VLM_CPU_INCLUDES_ONLY
