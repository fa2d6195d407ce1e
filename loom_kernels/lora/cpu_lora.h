// Segmented LoRA on CPU: y[row] += (x[row] @ A[slot].T) @ B[slot].T for the rows that carry an adapter, float32
// accumulation (a few rows: loops that round once into y; a prompt's segment: ATen's GEMM, its delta rounded to y's
// dtype, then added). Used by the LoRA extension (cpu_lora.cpp) and compiled into the decode stack.
#pragma once

#include "cpu/prelude.h"

namespace {

// Rows grouped by slot: group g is rows[starts[g]:starts[g + 1]], all on slots[g] (a slot's weights are read once
// for all its rows).
struct LoraRows {
  std::vector<int64_t> rows, starts{0}, slots;
};

// A `[T]` slot per row (-1: the base model) as LoraRows, slots in increasing order.
static LoraRows lora_rows_of(const at::Tensor& row_slots, int64_t num_slots) {
  LoraRows g;
  const at::Tensor s = row_slots.to(at::kLong).contiguous();
  const int64_t* p = s.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> by_slot(num_slots);
  for (int64_t i = 0; i < s.numel(); ++i) {
    TORCH_CHECK(p[i] < num_slots, "lora: slot ", p[i], " out of range (", num_slots, " slots)");
    if (p[i] >= 0) by_slot[p[i]].push_back(i);
  }
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    if (by_slot[slot].empty()) continue;
    g.rows.insert(g.rows.end(), by_slot[slot].begin(), by_slot[slot].end());
    g.starts.push_back(static_cast<int64_t>(g.rows.size()));
    g.slots.push_back(slot);
  }
  return g;
}

#if defined(__AVX2__) && defined(__FMA__)
#define LORA_AVX2 1
static inline __m256 lora_load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 lora_load8(const at::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline __m256 lora_load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline float lora_hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#endif

// sum a[i] * b[i]: four independent accumulators (one FMA chain waits on its latency, four fill the pipe).
template <typename T, typename U>
static inline float lora_dot(const T* a, const U* b, int64_t n) {
  int64_t i = 0;
  float acc = 0.f;
#ifdef LORA_AVX2
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(lora_load8(a + i), lora_load8(b + i), s0);
    s1 = _mm256_fmadd_ps(lora_load8(a + i + 8), lora_load8(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(lora_load8(a + i + 16), lora_load8(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(lora_load8(a + i + 24), lora_load8(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(lora_load8(a + i), lora_load8(b + i), s0);
  acc = lora_hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#endif
  for (; i < n; ++i) acc += widen(a[i]) * widen(b[i]);
  return acc;
}

// out[q] = sum t[i] * b[q * stride + i] for q < 4: four short dots (an expand's outputs over a small rank) at once,
// reduced together.
template <typename T>
static inline void lora_dot4(const float* t, const T* b, int64_t stride, int64_t n, float* out) {
  int64_t i = 0;
#ifdef LORA_AVX2
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (; i + 8 <= n; i += 8) {
    const __m256 tv = _mm256_loadu_ps(t + i);
    s0 = _mm256_fmadd_ps(tv, lora_load8(b + i), s0);
    s1 = _mm256_fmadd_ps(tv, lora_load8(b + stride + i), s1);
    s2 = _mm256_fmadd_ps(tv, lora_load8(b + 2 * stride + i), s2);
    s3 = _mm256_fmadd_ps(tv, lora_load8(b + 3 * stride + i), s3);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
  for (int q = 0; q < 4; ++q) out[q] = 0.f;
#endif
  for (; i < n; ++i)
    for (int q = 0; q < 4; ++q) out[q] += t[i] * widen(b[q * stride + i]);
}

// A segment of many rows (a prompt's) is a small GEMM: ATen's, in float32, then added to its rows of y.
static void lora_segment_gemm(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                              const int64_t* rows, int64_t m, int64_t slot) {
  const at::Tensor idx = at::from_blob(const_cast<int64_t*>(rows), {m}, at::TensorOptions().dtype(at::kLong));
  const at::Tensor xs = x.index_select(0, idx).to(at::kFloat);
  const at::Tensor delta = at::mm(at::mm(xs, a[slot].to(at::kFloat).t()), b[slot].to(at::kFloat).t());
  y.index_add_(0, idx, delta.to(y.scalar_type()));
}

constexpr int64_t LORA_GEMM_ROWS = 16;  // from this many rows on a segment takes the GEMM
constexpr int64_t LORA_CHUNK = 64;  // outputs per expand work item (and per window of the slot metadata)

// What each slot of a linear holds, where it is known (`lora_slot_meta` in cpu_lora.py, kept beside the stacks):
// row s is [rank, lo_0, hi_0, lo_1, hi_1, ...]: A's non-zero rows, and per LORA_CHUNK outputs the columns of B that
// are not zero (a fused projection's B is block-diagonal over its parts). Without it: all of A, and the columns up
// to each row's last non-zero shrink value.
struct LoraMeta {
  const int32_t* p = nullptr;
  int64_t stride = 0;
};

// The trailing zero shrink values of a row (its slot's unused ranks) add nothing: its expand reads up to the last
// non-zero one, rounded up to whole vectors.
static inline int64_t lora_used_rank(const float* t, int64_t R) {
  int64_t r = R;
  while (r > 0 && t[r - 1] == 0.f) --r;
  return std::min(R, (r + 7) / 8 * 8);
}

// Segments of a few rows (decode steps): one dot product per (row, rank), then per (row, output), float32 sums.
// Threads only from a million multiply-adds on, in one region (a barrier between the two loops): a step runs this
// for every linear, and where other work shares the cores each region's start and barrier can wait a scheduler
// slice, far more than a small product takes on one core.
template <typename T>
static void lora_loops(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                       const LoraRows& g, LoraMeta meta) {
  const int64_t G = static_cast<int64_t>(g.slots.size()), M = static_cast<int64_t>(g.rows.size());
  if (M == 0) return;
  const int64_t R = a.size(1), K = a.size(2), N = b.size(1), xs = x.stride(0), ys = y.stride(0);
  const int64_t chunks = (N + LORA_CHUNK - 1) / LORA_CHUNK;
  const T* xp = x.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  std::vector<float> t(M * R);  // zeros: the ranks a slot does not use stay zero
  auto shrink = [&](int64_t it) {
    const int64_t grp = it / R, r = it % R, slot = g.slots[grp];
    if (meta.p && r >= meta.p[slot * meta.stride]) return;
    const T* arow = ap + (slot * R + r) * K;
    for (int64_t j = g.starts[grp]; j < g.starts[grp + 1]; ++j) t[j * R + r] = lora_dot(xp + g.rows[j] * xs, arow, K);
  };
  auto expand = [&](int64_t it) {
    const int64_t grp = it / chunks, c = it % chunks, n0 = c * LORA_CHUNK, n1 = std::min(N, n0 + LORA_CHUNK);
    const int64_t slot = g.slots[grp];
    const int64_t c0 = meta.p ? meta.p[slot * meta.stride + 1 + 2 * c] : 0;
    const int64_t c1 = meta.p ? meta.p[slot * meta.stride + 2 + 2 * c] : R;
    const T* bs = bp + slot * N * R + c0;
    float d[4];
    for (int64_t j = g.starts[grp]; j < g.starts[grp + 1]; ++j) {
      const float* tj = t.data() + j * R + c0;
      const int64_t len = std::min(c1, lora_used_rank(t.data() + j * R, R)) - c0;
      T* out = yp + g.rows[j] * ys;
      for (int64_t n = n0; len > 0 && n < n1; n += 4) {
        if (n + 4 <= n1) {
          lora_dot4(tj, bs + n * R, R, len, d);
          for (int q = 0; q < 4; ++q) out[n + q] = static_cast<T>(widen(out[n + q]) + d[q]);
        } else {
          for (int64_t q = n; q < n1; ++q) out[q] = static_cast<T>(widen(out[q]) + lora_dot(tj, bs + q * R, len));
        }
      }
    }
  };
  const int threads = M * R * (K + N) >= (1 << 20) && !at::in_parallel_region() ? at::get_num_threads() : 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static, 1)
    for (int64_t it = 0; it < G * R; ++it) shrink(it);
#pragma omp for schedule(static, 1)
    for (int64_t it = 0; it < G * chunks; ++it) expand(it);
  }
}

// x [T, K], y [T, N] (unit column stride), a [S, R, K], b [S, N, R] contiguous, all of dtype T.
template <typename T>
static void lora_apply(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                       const LoraRows& all, LoraMeta meta = {}) {
  LoraRows few;
  for (size_t grp = 0; grp < all.slots.size(); ++grp) {
    const int64_t lo = all.starts[grp], m = all.starts[grp + 1] - lo;
    if (m >= LORA_GEMM_ROWS) {
      lora_segment_gemm(y, x, a, b, all.rows.data() + lo, m, all.slots[grp]);
    } else if (m > 0) {
      few.rows.insert(few.rows.end(), all.rows.begin() + lo, all.rows.begin() + lo + m);
      few.starts.push_back(static_cast<int64_t>(few.rows.size()));
      few.slots.push_back(all.slots[grp]);
    }
  }
  lora_loops<T>(y, x, a, b, few, meta);
}

// Checks shared by both callers: shapes, dtypes and layouts the loops above assume.
static void lora_check(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && a.dim() == 3 && b.dim() == 3, "lora: x [T, K], y [T, N], a, b stacks");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && a.is_contiguous() && b.is_contiguous(), "lora: bad layout");
  TORCH_CHECK(a.size(2) == x.size(1) && b.size(1) == y.size(1) && b.size(2) == a.size(1) && a.size(0) == b.size(0) &&
                  x.size(0) == y.size(0), "lora: shapes do not match");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && a.scalar_type() == x.scalar_type() &&
                  b.scalar_type() == x.scalar_type(), "lora: x, y and the stacks must share one dtype");
}

// The metadata tensor [S, 1 + 2 * chunks] int32 of a linear with `slots` slots and `n` outputs, checked.
static LoraMeta lora_meta_of(const at::Tensor& meta, int64_t slots, int64_t n) {
  TORCH_CHECK(meta.scalar_type() == at::kInt && meta.is_contiguous() && meta.dim() == 2 && meta.size(0) == slots &&
                  meta.size(1) == 1 + 2 * ((n + LORA_CHUNK - 1) / LORA_CHUNK),
              "lora: slot metadata [S, 1 + 2 * ceil(N / 64)] int32, contiguous");
  return {meta.data_ptr<int32_t>(), meta.size(1)};
}

static void lora_dispatch(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                          const LoraRows& g, LoraMeta meta) {
  switch (x.scalar_type()) {
    case at::kBFloat16: lora_apply<at::BFloat16>(y, x, a, b, g, meta); break;
    case at::kHalf: lora_apply<at::Half>(y, x, a, b, g, meta); break;
    case at::kFloat: lora_apply<float>(y, x, a, b, g, meta); break;
    default: TORCH_CHECK(false, "lora: unsupported dtype");
  }
}

}  // namespace
