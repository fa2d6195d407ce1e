// GGUF-style 32-weight blocks (Q4 and Q8_0 as a checkpoint stores them): the small-M GEMM `block_linear`, used by
// the blocks extension (blocks.cpp) and compiled into the decode stack (fused_cpu/decode_stack.cpp) too.
#pragma once

#include <algorithm>
#include <type_traits>

#include "cpu/prelude.h"

namespace {

// Activations for one call: float32 rows padded to whole blocks, and each block's sum (for Q4's m term).
struct BlockActs {
  std::vector<float> x, sums;
  // bf16 activations for the AVX512-BF16 Q4 path: per pair of blocks, the first halves of both (32 values), then
  // the second halves, as the nibble vectors hold their weights; an odd last block is paired with zeros
  std::vector<uint16_t> xb;
  int64_t rows = 0, kp = 0, groups = 0, pairs = 0;
};

template <typename T>
static BlockActs block_acts(const at::Tensor& x, int64_t groups, bool want_sums) {
  BlockActs a;
  a.rows = x.size(0); a.groups = groups; a.kp = groups * 32;
  a.x.assign(a.rows * a.kp, 0.f);
  const int64_t k = x.size(1), sx = x.stride(0);
  const T* p = x.data_ptr<T>();
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t i = 0; i < k; ++i) a.x[r * a.kp + i] = widen(p[r * sx + i]);
  if (want_sums) {
    a.sums.assign(a.rows * groups, 0.f);
    for (int64_t r = 0; r < a.rows; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        float s = 0.f;
        for (int j = 0; j < 32; ++j) s += a.x[r * a.kp + g * 32 + j];
        a.sums[r * groups + g] = s;
      }
  }
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (want_sums && std::is_same<T, at::BFloat16>::value) {  // only where x is bf16 already: no extra rounding
    a.pairs = (groups + 1) / 2;
    a.xb.assign(a.rows * a.pairs * 64, 0);
    for (int64_t r = 0; r < a.rows; ++r)
      for (int64_t g = 0; g < groups; ++g)
        for (int j = 0; j < 32; ++j) {
          const float v = a.x[r * a.kp + g * 32 + j];
          uint32_t bits;
          std::memcpy(&bits, &v, 4);
          a.xb[r * a.pairs * 64 + (g / 2) * 64 + (j / 16) * 32 + (g % 2) * 16 + j % 16] = uint16_t(bits >> 16);
        }
  }
#endif
  return a;
}

static inline float half_bits_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// One weight row's fp16 scales as float32 (vectorized where the ISA allows).
static inline void widen_halves(const uint16_t* h, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
#endif
  for (; i < n; ++i) out[i] = half_bits_to_float(h[i]);
}

#if defined(__AVX512F__)
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// dot over one weight row for R activation rows: Q4 (kind 0) or Q8 (kind 1). x rows at x + r * kp.
template <int KIND, int R>
static inline void row_dot(const uint8_t* q, const float* d, const float* m, const float* x, int64_t kp,
                           const float* sums, int64_t G, float* res) {
#if defined(__AVX512F__)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  // nibble -> float through a 16-entry table: vpermps reads only an index's low 4 bits, so the widened byte serves
  // as the low nibble's index and the byte shifted right by 4 as the high one's (4 ops instead of 7)
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g = 0; g < G; ++g) {
    __m512 w0, w1;
    if (KIND == 0) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + 16 * g)));
      w0 = _mm512_permutexvar_ps(b, table);
      w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
    } else {
      w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 32 * g))));
      w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 32 * g + 16))));
    }
    const __m512 dg = _mm512_set1_ps(d[g]);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * kp + 32 * g;
      __m512 t = _mm512_mul_ps(w0, _mm512_loadu_ps(xr));
      t = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), t);
      acc[r] = _mm512_fmadd_ps(t, dg, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) res[r] = hsum(acc[r]);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    __m256 w[4];
    if (KIND == 0) {
      const __m128i b = _mm_loadu_si128((const __m128i*)(q + 16 * g));
      const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
      w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    } else {
      const __m128i b0 = _mm_loadu_si128((const __m128i*)(q + 32 * g));
      const __m128i b1 = _mm_loadu_si128((const __m128i*)(q + 32 * g + 16));
      w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0));
      w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b0, 8)));
      w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1));
      w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b1, 8)));
    }
    const __m256 dg = _mm256_set1_ps(d[g]);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * kp + 32 * g;
      __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(xr));
      t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr + 8), t);
      t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), t);
      t = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), t);
      acc[r] = _mm256_fmadd_ps(t, dg, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) res[r] = hsum(acc[r]);
#else
  for (int r = 0; r < R; ++r) res[r] = 0.f;
  for (int64_t g = 0; g < G; ++g)
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * kp + 32 * g;
      float t = 0.f;
      for (int j = 0; j < 16; ++j) {
        if (KIND == 0) t += float(q[16 * g + j] & 15) * xr[j] + float(q[16 * g + j] >> 4) * xr[16 + j];
        else t += float(int8_t(q[32 * g + j])) * xr[j] + float(int8_t(q[32 * g + 16 + j])) * xr[16 + j];
      }
      res[r] += t * d[g];
    }
#endif
  if (KIND == 0)  // the m term: sum over blocks of m * (sum of the block's activations)
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t g = 0; g < G; ++g) s += m[g] * sums[r * G + g];
      res[r] += s;
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// Q4 with bf16 dot products: a pair of blocks' 64 nibbles become two vectors of 32 bf16 weights through a 32-entry
// vpermw table (it reads an index's low 5 bits: the widened byte serves the low nibble, the byte >> 4 the high one),
// and vdpbf16ps multiplies them with the bf16 activations, accumulating in float32 (exact products of 0..15 and
// bf16 values). Lanes 0-7 hold the pair's first block, 8-15 its second, scaled by their d.
template <int R>
static inline void row_dot_q4_bf16(const uint8_t* q, const float* d, const float* m, const uint16_t* xb,
                                   int64_t pair_stride, const float* sums, int64_t G, float* res) {
  const __m512i table = _mm512_set_epi16(0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0,
                                         0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000, 0x4170, 0x4160,
                                         0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0,
                                         0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t P = (G + 1) / 2;
  for (int64_t p = 0; p < P; ++p) {
    const bool full = 2 * p + 1 < G;
    const __m256i bytes = full ? _mm256_loadu_si256((const __m256i*)(q + 32 * p))
                               : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(q + 32 * p)));
    const __m512i w = _mm512_cvtepu8_epi16(bytes);
    const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(w, table);
    const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
    const __m512 dv = _mm512_mask_mov_ps(_mm512_set1_ps(d[2 * p]), 0xFF00, _mm512_set1_ps(full ? d[2 * p + 1] : 0.f));
    for (int r = 0; r < R; ++r) {
      const uint16_t* x = xb + r * pair_stride + 64 * p;
      __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, (__m512bh)_mm512_loadu_si512(x));
      t = _mm512_dpbf16_ps(t, hi, (__m512bh)_mm512_loadu_si512(x + 32));
      acc[r] = _mm512_fmadd_ps(t, dv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512 mt = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= G; g += 16) mt = _mm512_fmadd_ps(_mm512_loadu_ps(m + g), _mm512_loadu_ps(sums + r * G + g), mt);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], mt));
    for (; g < G; ++g) s += m[g] * sums[r * G + g];
    res[r] = s;
  }
}
#endif

template <int KIND, int R, typename T>
static void rows_pass(const BlockActs& a, int64_t r0, const uint8_t* codes, int64_t row_bytes, const float* d,
                      const float* m, int64_t n, T* out, int64_t ldo) {
  float res[R];
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (KIND == 0 && !a.xb.empty()) {
    row_dot_q4_bf16<R>(codes + n * row_bytes, d, m, a.xb.data() + r0 * a.pairs * 64, a.pairs * 64,
                       a.sums.data() + r0 * a.groups, a.groups, res);
    for (int r = 0; r < R; ++r) out[(r0 + r) * ldo + n] = static_cast<T>(res[r]);
    return;
  }
#endif
  row_dot<KIND, R>(codes + n * row_bytes, d, m, a.x.data() + r0 * a.kp, a.kp,
                   KIND == 0 ? a.sums.data() + r0 * a.groups : nullptr, a.groups, res);
  for (int r = 0; r < R; ++r) out[(r0 + r) * ldo + n] = static_cast<T>(res[r]);  // one rounding, as .to() would
}

// out[M, N] = x[M, K] . w^T over N rows of blocks, accumulated in float32; kind 0: Q4 (d, m), kind 1: Q8_0 (d).
template <int KIND, typename T>
static void block_gemm(const BlockActs& a, const at::Tensor& codes, const at::Tensor& d, const at::Tensor& m,
                       T* out) {
  const int64_t N = codes.size(0), G = a.groups, row_bytes = codes.size(1);
  const uint8_t* cp = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr());
  const uint16_t* mp = KIND == 0 ? reinterpret_cast<const uint16_t*>(m.data_ptr()) : nullptr;
  // rows of 16 weights per task: a task's blocks stay in L1 across the activation passes
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> df(16 * G), mf(KIND == 0 ? 16 * G : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * 16, n1 = std::min<int64_t>(N, n0 + 16);
      widen_halves(dp + n0 * G, df.data(), (n1 - n0) * G);
      if (KIND == 0) widen_halves(mp + n0 * G, mf.data(), (n1 - n0) * G);
      int64_t r0 = 0;
      for (; r0 + 4 <= a.rows; r0 += 4)
        for (int64_t n = n0; n < n1; ++n)
          rows_pass<KIND, 4, T>(a, r0, cp, row_bytes, df.data() + (n - n0) * G,
                             KIND == 0 ? mf.data() + (n - n0) * G : nullptr, n, out, N);
      const int64_t rest = a.rows - r0;
      for (int64_t n = n0; n < n1 && rest; ++n) {
        const float* dn = df.data() + (n - n0) * G;
        const float* mn = KIND == 0 ? mf.data() + (n - n0) * G : nullptr;
        if (rest == 1) rows_pass<KIND, 1, T>(a, r0, cp, row_bytes, dn, mn, n, out, N);
        else if (rest == 2) rows_pass<KIND, 2, T>(a, r0, cp, row_bytes, dn, mn, n, out, N);
        else rows_pass<KIND, 3, T>(a, r0, cp, row_bytes, dn, mn, n, out, N);
      }
    }
  });
}

template <typename T>
static void run_block_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d, const at::Tensor& m,
                             int64_t kind, at::Tensor& out) {
  const BlockActs a = block_acts<T>(x, d.size(1), kind == 0);
  if (kind == 0) block_gemm<0, T>(a, codes, d, m, out.data_ptr<T>());
  else block_gemm<1, T>(a, codes, d, m, out.data_ptr<T>());
}

// x [M, K] (float32 / bfloat16 / float16) -> [M, N] in x's dtype.
static at::Tensor block_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& d,
                               const at::Tensor& m, int64_t kind) {
  TORCH_CHECK(x_in.dim() == 2, "block_linear: x [M, K]");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && codes.element_size() == 1 && d.is_contiguous()
              && d.scalar_type() == at::kHalf && d.size(0) == codes.size(0), "block_linear: codes / d layout");
  TORCH_CHECK(kind == 1 || (m.is_contiguous() && m.scalar_type() == at::kHalf && m.sizes() == d.sizes()),
              "block_linear: m like d");
  const int64_t G = d.size(1);
  TORCH_CHECK(codes.size(1) == G * (kind == 0 ? 16 : 32) && x_in.size(1) <= G * 32, "block_linear: K mismatch");
  at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  at::Tensor out = at::empty({x.size(0), codes.size(0)}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: run_block_linear<float>(x, codes, d, m, kind, out); break;
    case at::kBFloat16: run_block_linear<at::BFloat16>(x, codes, d, m, kind, out); break;
    case at::kHalf: run_block_linear<at::Half>(x, codes, d, m, kind, out); break;
    default: TORCH_CHECK(false, "block_linear: unsupported activation dtype");
  }
  return out;
}

}  // namespace
