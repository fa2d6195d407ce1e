// The GGUF block GEMM against int8 activations, as llama.cpp runs its CPU dot products: each activation row is
// quantized per 32 values (int8 codes, scale d = max|x| / 127, round to nearest even), and each 32-weight sub-block's
// integer dot product with them is exact (vpmaddubsw + vpmaddwd, or one vpdpbusd with AVX512-VNNI), then scaled once
// by the weight's group scale times d. Against widening every code to float32 (kquants.h) that is ~4 ops per 32
// weights instead of ~12, where decoding bounds the small-M GEMM on AVX2 CPUs; the cost is the activations' 8-bit
// rounding (the result is exactly the GEMM of the de-quantized weights with the de-quantized activations, up to
// float32 summation order). The caller's calibration picks it per batch size only where it is faster and the
// operator allows int8 activations.
//
// Codes enter the dot unsigned (Q4/Q5 nibbles, Q6_K's 6-bit values before its -32), their offsets go through the
// mins: Q4_0's -8 d, Q5_0's -16 d, Q4_1 / Q5_1 / Q4_K / Q5_K's m, and Q6_K's -32 sc per 16 weights, each against the
// activations' de-quantized sums. Q8_0's signed codes take the sign trick (|w| times x with w's sign).
#pragma once

#include "quant/kquants.h"

namespace {

// Activations quantized per 32 values: codes [rows, kp] (zeros past K), and per block its d and the de-quantized
// sums of its 32 values and of each half.
struct KqActsQ8 {
  std::vector<int8_t> q;
  std::vector<float> d, sums, sums16;
  int64_t rows = 0, k = 0, kp = 0, sp = 0;
};

// 32 floats -> codes round(x * id); returns the sum of the codes of each half.
static inline std::pair<int, int> kq8_codes32(const float* x, float id, int8_t* q) {
  int s0 = 0, s1 = 0;
#if defined(__AVX2__)
  __m256i v[4];
  for (int i = 0; i < 4; ++i) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), _mm256_set1_ps(id)));
  // packs interleave the 128-bit lanes: the permute puts the 32 codes back in order
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_add_epi32(v[0], v[1]));
  for (int j = 0; j < 8; ++j) s0 += t[j];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_add_epi32(v[2], v[3]));
  for (int j = 0; j < 8; ++j) s1 += t[j];
#else
  for (int j = 0; j < 32; ++j) {
    const int c = static_cast<int>(std::nearbyint(x[j] * id));
    q[j] = static_cast<int8_t>(c);
    (j < 16 ? s0 : s1) += c;
  }
#endif
  return {s0, s1};
}

// One block of 32 floats -> codes with d = max|x| / 127; returns the sum of the codes of each half.
static inline std::pair<int, int> kq8_quantize_block(const float* x, int8_t* q, float* d) {
  float amax = 0.f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  *d = amax / 127.f;
  return kq8_codes32(x, amax > 0.f ? 127.f / amax : 0.f, q);
}

template <typename T>
static KqActsQ8 kq8_acts(const at::Tensor& x) {
  KqActsQ8 a;
  a.rows = x.size(0); a.k = x.size(1);
  a.kp = (a.k + KQ_TILE - 1) / KQ_TILE * KQ_TILE; a.sp = a.kp / 32;
  a.q.assign(a.rows * a.kp, 0);
  a.d.assign(a.rows * a.sp, 0.f);
  a.sums.assign(a.rows * a.sp, 0.f);
  a.sums16.assign(a.rows * a.sp * 2, 0.f);
  const int64_t sx = x.stride(0);
  const T* p = x.data_ptr<T>();
  alignas(32) float buf[32];
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t s = 0; s < a.k / 32; ++s) {
      for (int j = 0; j < 32; ++j) buf[j] = widen(p[r * sx + 32 * s + j]);
      const int64_t b = r * a.sp + s;
      const auto [s0, s1] = kq8_quantize_block(buf, a.q.data() + r * a.kp + 32 * s, &a.d[b]);
      a.sums[b] = a.d[b] * static_cast<float>(s0 + s1);
      a.sums16[2 * b] = a.d[b] * static_cast<float>(s0);
      a.sums16[2 * b + 1] = a.d[b] * static_cast<float>(s1);
    }
  return a;
}

#if defined(__AVX2__) && defined(__FMA__)
// Eight lanes of sums of 4 adjacent products u8 * s8: lanes 0-3 hold weights 0-15, lanes 4-7 weights 16-31.
static inline __m256i kq8_dot(__m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

// The tile's codes, one vector per 32-weight sub-block, weights in order: unsigned, but Q8_0's signed.
template <int64_t TYPE>
static inline void kq8_codes(const uint8_t* p, int nsub, __m256i* w) {
  using Fm = KqFmt<TYPE>;
  const __m256i m4 = _mm256_set1_epi8(15);
  if constexpr (TYPE == KQ_Q4_K || TYPE == KQ_Q5_K) {
    constexpr bool FIVE = TYPE == KQ_Q5_K;
    const __m256i h = FIVE ? kq_load32(p + 16) : _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i v = kq_load32(p + (FIVE ? 48 : 16) + 32 * c);
      w[2 * c] = _mm256_and_si256(v, m4);
      w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      if (FIVE) {
        w[2 * c] = _mm256_or_si256(w[2 * c], kq_bit16(h, 2 * c));
        w[2 * c + 1] = _mm256_or_si256(w[2 * c + 1], kq_bit16(h, 2 * c + 1));
      }
    }
  } else if constexpr (TYPE == KQ_Q6_K) {
    const __m256i m2 = _mm256_set1_epi8(0x30);
    for (int n = 0; n < 2; ++n) {
      const __m256i a = kq_load32(p + 64 * n), b = kq_load32(p + 64 * n + 32), h = kq_load32(p + 128 + 32 * n);
      w[4 * n] = _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_and_si256(_mm256_slli_epi16(h, 4), m2));
      w[4 * n + 1] = _mm256_or_si256(_mm256_and_si256(b, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m2));
      w[4 * n + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), _mm256_and_si256(h, m2));
      w[4 * n + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), m4),
                                     _mm256_and_si256(_mm256_srli_epi16(h, 2), m2));
    }
  } else {
    for (int s = 0; s < nsub; ++s) {
      const uint8_t* b = p + s * Fm::BYTES;
      if constexpr (TYPE == KQ_Q8_0) {
        w[s] = kq_load32(b + 2);
      } else {
        const uint8_t* qs = b + Fm::BYTES - 16;
        w[s] = kq_nibbles16(qs);
        if constexpr (TYPE == KQ_Q5_0 || TYPE == KQ_Q5_1) {
          uint32_t h;
          std::memcpy(&h, qs - 4, 4);
          w[s] = _mm256_or_si256(w[s], kq_bits16(h));
        }
      }
    }
  }
}

// Eight vectors of lane sums -> one: lane s the sum of d[s]'s lanes 0-3 (lo) and 4-7 (hi), i.e. of weights 0-15 and
// 16-31 of sub-block s.
static inline std::pair<__m256i, __m256i> kq8_reduce(const __m256i* d) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7]));
  return {_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31)};
}

// The sub-blocks' dots are reduced to one vector (lane s: sub-block s) and scaled by the weights' scales times the
// activations' d in one product per tile, not one per sub-block.
template <int64_t TYPE, int R>
static void kq8_row_dot(const uint8_t* row, const KqActsQ8& a, int64_t r0, float* res) {
  using Fm = KqFmt<TYPE>;
  alignas(32) float sc[16], mn[8], even[8], odd[8];
  __m256 acc[R], macc[R];
  for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); macc[r] = _mm256_setzero_ps(); }
  for (int64_t k0 = 0; k0 < a.k; k0 += KQ_TILE) {
    const uint8_t* p = row + k0 / Fm::QK * Fm::BYTES;
    const int nsub = Fm::QK == KQ_TILE ? 8 : kq_nsub(a.k, k0);
    kq_tile_scales<TYPE>(p, nsub, sc, mn);
    if constexpr (Fm::GS == 16)
      for (int s = 0; s < 8; ++s) { even[s] = sc[2 * s]; odd[s] = sc[2 * s + 1]; }
    __m256i w[8];
    kq8_codes<TYPE>(p, nsub, w);
    for (int s = nsub; s < 8; ++s) w[s] = _mm256_setzero_si256();
    for (int r = 0; r < R; ++r) {
      const int64_t b0 = (r0 + r) * a.sp + k0 / 32;
      const int8_t* xq = a.q.data() + (r0 + r) * a.kp + k0;
      __m256i dot[8];
      for (int s = 0; s < 8; ++s) {
        const __m256i x = kq_load32(reinterpret_cast<const uint8_t*>(xq + 32 * s));
        dot[s] = TYPE == KQ_Q8_0 ? kq8_dot(_mm256_abs_epi8(w[s]), _mm256_sign_epi8(x, w[s])) : kq8_dot(w[s], x);
      }
      const auto [lo, hi] = kq8_reduce(dot);
      const __m256 dx = _mm256_loadu_ps(a.d.data() + b0);
      if constexpr (Fm::GS == 16) {  // lo: groups 2s, hi: groups 2s + 1
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(_mm256_load_ps(even), dx), acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(_mm256_load_ps(odd), dx), acc[r]);
      } else {
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), _mm256_mul_ps(_mm256_load_ps(sc), dx),
                                 acc[r]);
      }
      if constexpr (TYPE == KQ_Q6_K) {  // the codes' -32, per 16 weights
        const __m256 m32 = _mm256_set1_ps(-32.f);
        const float* s16 = a.sums16.data() + 2 * b0;
        macc[r] = _mm256_fmadd_ps(_mm256_mul_ps(m32, _mm256_load_ps(sc)), _mm256_loadu_ps(s16), macc[r]);
        macc[r] = _mm256_fmadd_ps(_mm256_mul_ps(m32, _mm256_load_ps(sc + 8)), _mm256_loadu_ps(s16 + 8), macc[r]);
      } else if constexpr (Fm::MIN) {
        macc[r] = _mm256_fmadd_ps(_mm256_load_ps(mn), _mm256_loadu_ps(a.sums.data() + b0), macc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) res[r] = kq_hsum8(_mm256_add_ps(acc[r], macc[r]));
}

// The 32-weight types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) block by block, as llama.cpp's dot products run: each block's
// integer dot scaled at once by its d times the activations' d, without the 256-wide tile's scale arrays and
// horizontal reductions (one thread at K = 576: 1.5-2x the tile loop, measured on AMD Zen 3).
template <int64_t TYPE>
constexpr bool KQ8_PER_BLOCK = TYPE == KQ_Q4_0 || TYPE == KQ_Q4_1 || TYPE == KQ_Q5_0 || TYPE == KQ_Q5_1 ||
                               TYPE == KQ_Q8_0;

template <int64_t TYPE>
static inline __m256i kq8_block_codes(const uint8_t* p) {
  using Fm = KqFmt<TYPE>;
  if constexpr (TYPE == KQ_Q8_0) {
    return kq_load32(p + 2);
  } else {
    const uint8_t* qs = p + Fm::BYTES - 16;
    __m256i w = kq_nibbles16(qs);
    if constexpr (TYPE == KQ_Q5_0 || TYPE == KQ_Q5_1) {
      uint32_t h;
      std::memcpy(&h, qs - 4, 4);
      w = _mm256_or_si256(w, kq_bits16(h));
    }
    return w;
  }
}

// One block's min term factor: m (Q4_1 / Q5_1) or the codes' offset times d (Q4_0's -8 d, Q5_0's -16 d).
template <int64_t TYPE>
static inline float kq8_block_min(const uint8_t* p, float d) {
  if constexpr (TYPE == KQ_Q4_1 || TYPE == KQ_Q5_1) return kq_half(p + 2);
  else if constexpr (TYPE == KQ_Q4_0) return -8.f * d;
  else if constexpr (TYPE == KQ_Q5_0) return -16.f * d;
  else return 0.f;
}

template <int64_t TYPE>
static inline __m256 kq8_block_dot(__m256i w, const int8_t* xq) {
  const __m256i x = kq_load32(reinterpret_cast<const uint8_t*>(xq));
  const __m256i dot = TYPE == KQ_Q8_0 ? kq8_dot(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)) : kq8_dot(w, x);
  return _mm256_cvtepi32_ps(dot);
}

// One to four activation rows against each decoded block, one named accumulator per row (an array of them is
// spilled to the stack by GCC every step).
template <int64_t TYPE, int R>
static void kq8_row_dot_blocks(const uint8_t* row, const KqActsQ8& a, int64_t r0, float* res) {
  using Fm = KqFmt<TYPE>;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  float mins[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t b = 0; b < a.k / 32; ++b) {
    const uint8_t* p = row + b * Fm::BYTES;
    const float d = kq_half(p), mn = kq8_block_min<TYPE>(p, d);
    const __m256i w = kq8_block_codes<TYPE>(p);
    const auto one = [&](int r, __m256& acc) {
      const int64_t blk = (r0 + r) * a.sp + b;
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d[blk]), kq8_block_dot<TYPE>(w, a.q.data() + (r0 + r) * a.kp + 32 * b),
                            acc);
      if constexpr (Fm::MIN) mins[r] += mn * a.sums[blk];
    };
    one(0, acc0);
    if constexpr (R > 1) one(1, acc1);
    if constexpr (R > 2) one(2, acc2);
    if constexpr (R > 3) one(3, acc3);
  }
  const __m256 accs[4] = {acc0, acc1, acc2, acc3};
  for (int r = 0; r < R; ++r) res[r] = kq_hsum8(accs[r]) + mins[r];
}
#else
// Plain C++: a decoded tile (signed codes where the type has no min of its own) and integer dots per group.
template <int64_t TYPE, int R>
static void kq8_row_dot(const uint8_t* row, const KqActsQ8& a, int64_t r0, float* res) {
  using F = KqFmt<TYPE>;
  KqTile t;
  float acc[R] = {};
  for (int64_t k0 = 0; k0 < a.k; k0 += KQ_TILE) {
    const int nsub = kq_nsub(a.k, k0);
    kq_decode<TYPE>(row, k0, nsub, t);
    for (int r = 0; r < R; ++r) {
      const int64_t b0 = (r0 + r) * a.sp + k0 / 32;
      const int8_t* xq = a.q.data() + (r0 + r) * a.kp + k0;
      for (int g = 0; g < 32 * nsub / F::GS; ++g) {
        int dot = 0;
        for (int j = 0; j < F::GS; ++j) dot += int(t.q[g * F::GS + j]) * int(xq[g * F::GS + j]);
        acc[r] += static_cast<float>(dot) * (t.scale[g] * a.d[b0 + g * F::GS / 32]);
      }
      if (F::MIN)
        for (int s = 0; s < nsub; ++s) acc[r] += t.mn[s] * a.sums[b0 + s];
    }
  }
  for (int r = 0; r < R; ++r) res[r] = acc[r];
}
#endif

// R (1-4) activation rows from r0 against one weight row.
template <int64_t TYPE>
static inline void kq8_row_dot_any(const uint8_t* row, const KqActsQ8& a, int64_t r0, int64_t R, float* res) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (KQ8_PER_BLOCK<TYPE>) {
    switch (R) {
      case 4: return kq8_row_dot_blocks<TYPE, 4>(row, a, r0, res);
      case 3: return kq8_row_dot_blocks<TYPE, 3>(row, a, r0, res);
      case 2: return kq8_row_dot_blocks<TYPE, 2>(row, a, r0, res);
      default: return kq8_row_dot_blocks<TYPE, 1>(row, a, r0, res);
    }
  }
#endif
  switch (R) {
    case 4: return kq8_row_dot<TYPE, 4>(row, a, r0, res);
    case 3: return kq8_row_dot<TYPE, 3>(row, a, r0, res);
    case 2: return kq8_row_dot<TYPE, 2>(row, a, r0, res);
    default: return kq8_row_dot<TYPE, 1>(row, a, r0, res);
  }
}

template <int64_t TYPE>
static void kq8_rows(const KqSegment& s, int64_t n0, int64_t n1, const KqActsQ8& a, float* out, int64_t ldo) {
  float res[4];
  for (int64_t r0 = 0; r0 < a.rows; r0 += 4) {
    const int64_t R = std::min<int64_t>(4, a.rows - r0);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = s.data + n * s.row_bytes;
      kq8_row_dot_any<TYPE>(row, a, r0, R, res);
      for (int64_t r = 0; r < R; ++r) out[(r0 + r) * ldo + s.col + n] = res[r];
    }
  }
}

static void kq8_rows_any(const KqSegment& s, int64_t n0, int64_t n1, const KqActsQ8& a, float* out, int64_t ldo) {
  kq_with_type(s.type, [&](auto t) { kq8_rows<decltype(t)::value>(s, n0, n1, a, out, ldo); });
}

// x [M, K] (float32 / bfloat16 / float16) -> [M, N] in x's dtype: gguf_linear with x quantized to int8 per 32 values.
static at::Tensor gguf_linear_q8(const at::Tensor& x_in, const std::vector<at::Tensor>& raws,
                                 const std::vector<int64_t>& types, int64_t k) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "gguf_linear_q8: x [M, K] with K = ", k);
  const auto segs = kq_segments(raws, types, k);
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const KqActsQ8 a = kq_with_act_type(x, "gguf_linear_q8", [&](auto t) { return kq8_acts<decltype(t)>(x); });
  const int64_t N = kq_total_rows(segs);
  at::Tensor out = at::empty({x.size(0), N}, x.options().dtype(at::kFloat));
  const auto tasks = kq_tasks(segs);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) kq8_rows_any(segs[tasks[t][0]], tasks[t][1], tasks[t][2], a, o, N);
  });
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace
