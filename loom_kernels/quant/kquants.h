// llama.cpp GGUF blocks run straight from a file's bytes: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32-weight blocks) and the
// K-quants Q4_K, Q5_K, Q6_K (256-weight superblocks). Used by the kquants extension (kquants.cpp) and compiled into
// the decode stack (fused_cpu/decode_stack.cpp) too.
//
// A row is read in tiles of 256 weights (one superblock, or eight 32-weight blocks). Every weight is
//   w = scale[group] * code + mn[sub-block]
// with an integer code, a scale per group (16 weights for Q6_K, 32 otherwise) and, for all types but Q8_0 and Q6_K,
// a min per 32-weight sub-block (Q4_0's -8 d and Q5_0's -16 d are mins too; Q6_K's -32 is folded into its codes).
// scale * code is exact in float32 for every type (an fp16 mantissa times at most 14 more bits), and so is the
// weight where it has no min of its own, so the one rounding of "+ mn" is the only one: the weights are bit for bit
// gguf-py's numpy ones (e.g. Q4_K's `(d * sc) * q - dmin * m`) in any op order, with or without FMA contraction.
//
// The GEMM widens the codes to float32 in registers straight from the block bytes (a store and reload through a
// decoded buffer measured ~15% slower at one activation row, which this decoding bounds on AVX2: the nibble types
// widen bytes from memory, the 5- and 6-bit types put their bits together in 16-byte registers first), sums
// code * x per group, scales each group's sum once, and adds the min terms as one 8-wide product per tile against
// the activations' sub-block sums. The plain C++ path (no AVX2) decodes a tile into a buffer instead.
//
// At large M that GEMM is bound by decoding (each weight once per 4 activation rows); gguf_linear_tiled decodes each
// weight once per call instead, a panel of rows at a time into a float32 buffer for a float32 matmul.
#pragma once

#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>

#include "quant/blocks.h"

namespace {

// ggml's type ids (ggml.h), as gguf-py's GGMLQuantizationType numbers them.
enum KqType : int64_t { KQ_Q4_0 = 2, KQ_Q4_1 = 3, KQ_Q5_0 = 6, KQ_Q5_1 = 7, KQ_Q8_0 = 8, KQ_Q4_K = 12, KQ_Q5_K = 13,
                        KQ_Q6_K = 14 };

// Weights and bytes per block (ggml-common.h's block_* structs), weights per scale, and whether blocks have a min.
template <int QK_, int BYTES_, int GS_, bool MIN_>
struct KqLayout {
  static constexpr int QK = QK_, BYTES = BYTES_, GS = GS_;
  static constexpr bool MIN = MIN_;
};
template <int64_t TYPE> struct KqFmt;
template <> struct KqFmt<KQ_Q4_0> : KqLayout<32, 18, 32, true> {};
template <> struct KqFmt<KQ_Q4_1> : KqLayout<32, 20, 32, true> {};
template <> struct KqFmt<KQ_Q5_0> : KqLayout<32, 22, 32, true> {};
template <> struct KqFmt<KQ_Q5_1> : KqLayout<32, 24, 32, true> {};
template <> struct KqFmt<KQ_Q8_0> : KqLayout<32, 34, 32, false> {};
template <> struct KqFmt<KQ_Q4_K> : KqLayout<256, 144, 32, true> {};
template <> struct KqFmt<KQ_Q5_K> : KqLayout<256, 176, 32, true> {};
template <> struct KqFmt<KQ_Q6_K> : KqLayout<256, 210, 16, false> {};

// (weights, bytes) per block of `type`; (0, 0) for a type this kernel does not run.
static inline std::pair<int64_t, int64_t> kq_block_size(int64_t type) {
  switch (type) {
    case KQ_Q4_0: return {32, 18};
    case KQ_Q4_1: return {32, 20};
    case KQ_Q5_0: return {32, 22};
    case KQ_Q5_1: return {32, 24};
    case KQ_Q8_0: return {32, 34};
    case KQ_Q4_K: return {256, 144};
    case KQ_Q5_K: return {256, 176};
    case KQ_Q6_K: return {256, 210};
    default: return {0, 0};
  }
}

constexpr int KQ_TILE = 256;

static inline float kq_half(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return half_bits_to_float(v);
}

// ---- a tile's scales and mins ----

// Q4_K / Q5_K: eight 6-bit scales and mins packed in 12 bytes (get_scale_min_k4), unpacked four at a time as
// ggml's own kernels do: bytes 0-7 of u the scales, 8-15 the mins.
static inline void kq_k4_unpack(const uint8_t* s, uint32_t* u) {
  std::memcpy(u, s, 12);
  const uint32_t m6 = 0x3f3f3f3f, m4 = 0x0f0f0f0f, m2 = 0x03030303;
  u[3] = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4);
  const uint32_t mins_lo = u[1] & m6;
  u[1] = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);
  u[2] = mins_lo;
  u[0] &= m6;
}

static inline void kq_k4_scales(const uint8_t* s, float d, float dmin, float* sc, float* mn) {
  uint32_t u[4];
  kq_k4_unpack(s, u);
#if defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
  _mm256_storeu_ps(sc, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b))));
  _mm256_storeu_ps(mn, _mm256_mul_ps(_mm256_set1_ps(-dmin),
                                     _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))));
#else
  uint8_t b[16];
  std::memcpy(b, u, 16);
  for (int j = 0; j < 8; ++j) {
    sc[j] = d * static_cast<float>(b[j]);
    mn[j] = -dmin * static_cast<float>(b[8 + j]);
  }
#endif
}

// Q6_K: sixteen int8 scales times d.
static inline void kq_q6k_scales(const uint8_t* s, float d, float* sc) {
#if defined(__AVX2__)
  for (int h = 0; h < 2; ++h) {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + 8 * h)));
    _mm256_storeu_ps(sc + 8 * h, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(v)));
  }
#else
  for (int g = 0; g < 16; ++g) sc[g] = d * static_cast<float>(static_cast<int8_t>(s[g]));
#endif
}

// Scales (one per group) and mins (one per 32-weight sub-block, zero past nsub) of the tile at p.
template <int64_t TYPE>
static inline void kq_tile_scales(const uint8_t* p, int nsub, float* sc, float* mn) {
  using F = KqFmt<TYPE>;
  if constexpr (TYPE == KQ_Q4_K || TYPE == KQ_Q5_K) {
    kq_k4_scales(p + 4, kq_half(p), kq_half(p + 2), sc, mn);
  } else if constexpr (TYPE == KQ_Q6_K) {
    kq_q6k_scales(p + 192, kq_half(p + 208), sc);
  } else {
    for (int s = 0; s < 8; ++s) {
      const float d = s < nsub ? kq_half(p + s * F::BYTES) : 0.f;
      sc[s] = d;
      if (TYPE == KQ_Q4_1 || TYPE == KQ_Q5_1) mn[s] = s < nsub ? kq_half(p + s * F::BYTES + 2) : 0.f;
      else if (TYPE == KQ_Q4_0) mn[s] = -8.f * d;  // exact, and d * q - 8 d rounds to the exact d * (q - 8)
      else if (TYPE == KQ_Q5_0) mn[s] = -16.f * d;
    }
  }
}

// ---- a tile decoded into a buffer: the de-quantizer and the plain C++ GEMM ----

struct KqTile {
  alignas(64) int8_t q[KQ_TILE];
  alignas(32) float scale[16];
  alignas(32) float mn[8];
};

#if defined(__AVX2__)
// 16 packed bytes -> 32 codes: the low nibbles (weights 0-15), then the high ones (16-31).
static inline __m256i kq_nibbles16(const uint8_t* qs) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)), m = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

// Bit j of h -> byte j: 16 where set (Q5_0 / Q5_1's fifth bit).
static inline __m256i kq_bits16(uint32_t h) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                          3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(h)), spread);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(16));
}

// Byte j of h has bit b set -> 16, else 0 (Q5_K's fifth bit of sub-block b).
static inline __m256i kq_bit16(__m256i h, int b) {
  const __m256i bit = _mm256_set1_epi8(static_cast<char>(1 << b));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit), _mm256_set1_epi8(16));
}

static inline __m256i kq_load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline void kq_store32(int8_t* p, __m256i v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }
#endif

// 32-weight blocks: the codes of nsub blocks (1..8) of one tile.
template <int64_t TYPE>
static inline void kq_codes_legacy(const uint8_t* p, int nsub, int8_t* codes) {
  constexpr int B = KqFmt<TYPE>::BYTES;
  constexpr bool FIVE = TYPE == KQ_Q5_0 || TYPE == KQ_Q5_1;
  for (int s = 0; s < nsub; ++s) {
    const uint8_t* b = p + s * B;
    int8_t* q = codes + 32 * s;
    if constexpr (TYPE == KQ_Q8_0) {
      std::memcpy(q, b + 2, 32);
    } else {
      const uint8_t* qs = b + B - 16;  // the nibbles end every 32-weight block but Q8_0's
      uint32_t h = 0;
      if (FIVE) std::memcpy(&h, qs - 4, 4);
#if defined(__AVX2__)
      const __m256i v = kq_nibbles16(qs);
      kq_store32(q, FIVE ? _mm256_or_si256(v, kq_bits16(h)) : v);
#else
      for (int j = 0; j < 16; ++j) {
        q[j] = static_cast<int8_t>((qs[j] & 15) | (((h >> j) & 1) << 4));
        q[j + 16] = static_cast<int8_t>((qs[j] >> 4) | (((h >> (j + 16)) & 1) << 4));
      }
#endif
    }
  }
}

// Q4_K / Q5_K superblock: d, dmin, 12 bytes of scales, (Q5_K: 32 bytes of fifth bits,) 128 bytes of nibbles; each
// 32 nibble bytes hold sub-block 2c in their low and 2c + 1 in their high halves.
template <bool FIVE>
static inline void kq_codes_k45(const uint8_t* p, int8_t* codes) {
  const uint8_t* qh = p + 16;
  const uint8_t* qs = p + (FIVE ? 48 : 16);
#if defined(__AVX2__)
  const __m256i m4 = _mm256_set1_epi8(15);
  const __m256i h = FIVE ? kq_load32(qh) : _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) {
    const __m256i v = kq_load32(qs + 32 * c);
    __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    if (FIVE) {
      lo = _mm256_or_si256(lo, kq_bit16(h, 2 * c));
      hi = _mm256_or_si256(hi, kq_bit16(h, 2 * c + 1));
    }
    kq_store32(codes + 64 * c, lo);
    kq_store32(codes + 64 * c + 32, hi);
  }
#else
  for (int c = 0; c < 4; ++c)
    for (int j = 0; j < 32; ++j) {
      const int hb = FIVE ? qh[j] : 0;
      codes[64 * c + j] = static_cast<int8_t>((qs[32 * c + j] & 15) | (((hb >> (2 * c)) & 1) << 4));
      codes[64 * c + 32 + j] = static_cast<int8_t>((qs[32 * c + j] >> 4) | (((hb >> (2 * c + 1)) & 1) << 4));
    }
#endif
}

// Q6_K superblock: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, d. In 128-weight half n, the
// 32 weights of quarter i take ql[64n + 32(i & 1) + j]'s low (i < 2) or high nibble and bits 2i, 2i+1 of qh[32n + j];
// the codes are the 6-bit values - 32.
static inline void kq_codes_q6k(const uint8_t* p, int8_t* codes) {
  const uint8_t* ql = p;
  const uint8_t* qh = p + 128;
#if defined(__AVX2__)
  const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
  for (int n = 0; n < 2; ++n) {
    const __m256i a = kq_load32(ql + 64 * n), b = kq_load32(ql + 64 * n + 32), h = kq_load32(qh + 32 * n);
    const __m256i q0 = _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_and_si256(_mm256_slli_epi16(h, 4), m2));
    const __m256i q1 = _mm256_or_si256(_mm256_and_si256(b, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m2));
    const __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), _mm256_and_si256(h, m2));
    const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), m4),
                                       _mm256_and_si256(_mm256_srli_epi16(h, 2), m2));
    kq_store32(codes + 128 * n, _mm256_sub_epi8(q0, off));
    kq_store32(codes + 128 * n + 32, _mm256_sub_epi8(q1, off));
    kq_store32(codes + 128 * n + 64, _mm256_sub_epi8(q2, off));
    kq_store32(codes + 128 * n + 96, _mm256_sub_epi8(q3, off));
  }
#else
  for (int n = 0; n < 2; ++n)
    for (int j = 0; j < 32; ++j) {
      const int a = ql[64 * n + j], b = ql[64 * n + 32 + j], h = qh[32 * n + j];
      int8_t* q = codes + 128 * n + j;
      q[0] = static_cast<int8_t>(((a & 15) | ((h & 3) << 4)) - 32);
      q[32] = static_cast<int8_t>(((b & 15) | (((h >> 2) & 3) << 4)) - 32);
      q[64] = static_cast<int8_t>(((a >> 4) | (((h >> 4) & 3) << 4)) - 32);
      q[96] = static_cast<int8_t>(((b >> 4) | (((h >> 6) & 3) << 4)) - 32);
    }
#endif
}

// The tile of a row starting at weight k0 (nsub: its 32-weight sub-blocks, 8 but at a short row's end).
template <int64_t TYPE>
static inline void kq_decode(const uint8_t* row, int64_t k0, int nsub, KqTile& t) {
  const uint8_t* p = row + k0 / KqFmt<TYPE>::QK * KqFmt<TYPE>::BYTES;
  kq_tile_scales<TYPE>(p, nsub, t.scale, t.mn);
  if constexpr (TYPE == KQ_Q4_K) kq_codes_k45<false>(p, t.q);
  else if constexpr (TYPE == KQ_Q5_K) kq_codes_k45<true>(p, t.q);
  else if constexpr (TYPE == KQ_Q6_K) kq_codes_q6k(p, t.q);
  else kq_codes_legacy<TYPE>(p, nsub, t.q);
}

static inline int kq_nsub(int64_t K, int64_t k0) { return static_cast<int>(std::min<int64_t>(8, (K - k0) / 32)); }

// One row of K weights to float32. The large-M GEMM de-quantizes every weight once per call, so this runs 8 weights
// an op where it can (a group is 16 or 32 weights: a vector never straddles two scales); same ops, same bits.
template <int64_t TYPE>
static void kq_dequantize_row(const uint8_t* row, int64_t K, float* out) {
  using F = KqFmt<TYPE>;
  KqTile t;
  for (int64_t k0 = 0; k0 < K; k0 += KQ_TILE) {
    const int nsub = kq_nsub(K, k0);
    kq_decode<TYPE>(row, k0, nsub, t);
#if defined(__AVX2__)
    for (int i = 0; i < 32 * nsub; i += 8) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(t.q + i));
      const __m256 w = _mm256_mul_ps(_mm256_set1_ps(t.scale[i / F::GS]), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
      _mm256_storeu_ps(out + k0 + i, F::MIN ? _mm256_add_ps(w, _mm256_set1_ps(t.mn[i / 32])) : w);
    }
#else
    for (int i = 0; i < 32 * nsub; ++i) {
      const float w = t.scale[i / F::GS] * static_cast<float>(t.q[i]);  // exact
      out[k0 + i] = F::MIN ? w + t.mn[i / 32] : w;
    }
#endif
  }
}

// ---- activations ----

// float32 rows of kp = K rounded up to a tile (zeros past K), and each row's sums over 32-weight sub-blocks
// (sp = kp / 32 per row) for the min terms.
struct KqActs {
  std::vector<float> x, sums;
  int64_t rows = 0, k = 0, kp = 0, sp = 0;
};

template <typename T>
static KqActs kq_acts(const at::Tensor& x) {
  KqActs a;
  a.rows = x.size(0); a.k = x.size(1);
  a.kp = (a.k + KQ_TILE - 1) / KQ_TILE * KQ_TILE; a.sp = a.kp / 32;
  a.x.assign(a.rows * a.kp, 0.f);
  a.sums.assign(a.rows * a.sp, 0.f);
  const int64_t sx = x.stride(0);
  const T* p = x.data_ptr<T>();
  for (int64_t r = 0; r < a.rows; ++r) {
    float* xr = a.x.data() + r * a.kp;
    for (int64_t i = 0; i < a.k; ++i) xr[i] = widen(p[r * sx + i]);
    for (int64_t s = 0; s < a.k / 32; ++s) {
      float sum = 0.f;
      for (int j = 0; j < 32; ++j) sum += xr[32 * s + j];
      a.sums[r * a.sp + s] = sum;
    }
  }
  return a;
}

// ---- the vector GEMM: codes widened to float32 in registers, straight from the block bytes ----

#if defined(__AVX2__) && defined(__FMA__)
static inline float kq_hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// W float lanes and the integer ops the decoders need, for AVX2 (8) and AVX-512 (16): one decoder per type.
struct KqV8 {
  using F = __m256;
  using I = __m256i;
  static constexpr int W = 8;
  static I u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static I s8(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static I seti(int v) { return _mm256_set1_epi32(v); }
  static I iota(int from) { return _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), seti(from)); }
  static I band(I a, I b) { return _mm256_and_si256(a, b); }
  static I bor(I a, I b) { return _mm256_or_si256(a, b); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I shr(I a, int n) { return _mm256_srli_epi32(a, n); }
  static I shl(I a, int n) { return _mm256_slli_epi32(a, n); }
  static I shrv(I a, I n) { return _mm256_srlv_epi32(a, n); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(F a) { return kq_hsum8(a); }
};

// 16 codes (bytes in weight order) -> two vectors of 8 floats. On AVX2 the types with extra high bits are put
// together as bytes, 16 lanes an op, before this widening: per weight half the ops of doing it in 32-bit lanes.
static inline void kq_widen16(__m128i b, __m256* w) {
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
}

static inline __m128i kq_load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// Q5_0 / Q5_1 block: 16 nibble bytes, and bit j of h -> 16 in weight j.
static inline void kq_q5_block_v8(const uint8_t* qs, uint32_t h, __m256* w) {
  const __m128i v = kq_load16(qs), m4 = _mm_set1_epi8(15), sixteen = _mm_set1_epi8(16);
  const __m128i bit = _mm_set1_epi64x(0x8040201008040201LL), hv = _mm_set1_epi32(static_cast<int>(h));
  const __m128i spread_lo = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m128i spread_hi = _mm_setr_epi8(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m128i blo = _mm_and_si128(_mm_shuffle_epi8(hv, spread_lo), bit);
  const __m128i bhi = _mm_and_si128(_mm_shuffle_epi8(hv, spread_hi), bit);
  const __m128i lo = _mm_or_si128(_mm_and_si128(v, m4), _mm_and_si128(_mm_cmpeq_epi8(blo, bit), sixteen));
  const __m128i hi = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(v, 4), m4),
                                  _mm_and_si128(_mm_cmpeq_epi8(bhi, bit), sixteen));
  kq_widen16(lo, w);
  kq_widen16(hi, w + 2);
}

// Q5_K unit u: for 16 weights each, nibble bytes qs and fifth-bit bytes qh (bits 2u and 2u + 1).
static inline void kq_q5k_unit_v8(const uint8_t* qs, const uint8_t* qh, int u, __m256* w) {
  const __m128i m4 = _mm_set1_epi8(15), sixteen = _mm_set1_epi8(16), count = _mm_cvtsi32_si128(2 * u);
  for (int k = 0; k < 2; ++k) {
    const __m128i v = kq_load16(qs + 16 * k);
    const __m128i t = _mm_srl_epi16(kq_load16(qh + 16 * k), count);  // bit 2u -> 0 in each byte (2u + 1 <= 7)
    const __m128i lo = _mm_or_si128(_mm_and_si128(v, m4), _mm_and_si128(_mm_slli_epi16(t, 4), sixteen));
    const __m128i hi = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(v, 4), m4),
                                    _mm_and_si128(_mm_slli_epi16(t, 3), sixteen));
    kq_widen16(lo, w + 2 * k);
    kq_widen16(hi, w + 4 + 2 * k);
  }
}

// Q6_K unit: 32 low-nibble bytes ql and their bit-pair bytes qh (pair `part` for the low nibbles, part + 2 for the
// high ones), codes - 32.
static inline void kq_q6k_unit_v8(const uint8_t* ql, const uint8_t* qh, int part, __m256* w) {
  const __m128i m4 = _mm_set1_epi8(15), m2 = _mm_set1_epi8(0x30), off = _mm_set1_epi8(32);
  const __m128i count = _mm_cvtsi32_si128(2 * part);
  for (int k = 0; k < 2; ++k) {
    const __m128i l = kq_load16(ql + 16 * k), t = _mm_srl_epi16(kq_load16(qh + 16 * k), count);
    const __m128i a = _mm_or_si128(_mm_and_si128(l, m4), _mm_and_si128(_mm_slli_epi16(t, 4), m2));
    const __m128i b = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(l, 4), m4), _mm_and_si128(t, m2));
    kq_widen16(_mm_sub_epi8(a, off), w + 2 * k);
    kq_widen16(_mm_sub_epi8(b, off), w + 4 + 2 * k);
  }
}
#endif

#if defined(__AVX512F__)
struct KqV16 {
  using F = __m512;
  using I = __m512i;
  static constexpr int W = 16;
  static I u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I s8(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I seti(int v) { return _mm512_set1_epi32(v); }
  static I iota(int from) {
    return _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), seti(from));
  }
  static I band(I a, I b) { return _mm512_and_si512(a, b); }
  static I bor(I a, I b) { return _mm512_or_si512(a, b); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I shr(I a, int n) { return _mm512_srli_epi32(a, n); }
  static I shl(I a, int n) { return _mm512_slli_epi32(a, n); }
  static I shrv(I a, I n) { return _mm512_srlv_epi32(a, n); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(F a) { return _mm512_reduce_add_ps(a); }
};
#endif

#if defined(__AVX2__) && defined(__FMA__)
// The decoders below work in W 32-bit lanes (AVX-512, and the 4- and 8-bit types on AVX2, which widen bytes
// straight from memory); on AVX2 the 5- and 6-bit types take the byte-wise decoders above instead.
template <class V>
constexpr bool kq_bytewise = std::is_same<V, KqV8>::value;

// One 32-weight block (32 / W vectors, weights in order): nibbles, the fifth bits, or int8 codes.
template <int64_t TYPE, class V>
static inline void kq_unit_legacy(const uint8_t* b, typename V::F* w) {
  constexpr int NV = 32 / V::W, B = KqFmt<TYPE>::BYTES;
  constexpr bool FIVE = TYPE == KQ_Q5_0 || TYPE == KQ_Q5_1;
  using I = typename V::I;
  const uint8_t* qs = b + B - 16;  // the nibbles end every 32-weight block but Q8_0's
  uint32_t h = 0;
  if (FIVE) std::memcpy(&h, qs - 4, 4);
  if constexpr (TYPE == KQ_Q8_0) {
    for (int v = 0; v < NV; ++v) w[v] = V::cvt(V::s8(b + 2 + v * V::W));
  } else if constexpr (FIVE && kq_bytewise<V>) {
    kq_q5_block_v8(qs, h, w);
  } else {
    I q[NV];
    for (int v = 0; v < NV / 2; ++v) {  // byte i of qs: weight i (low nibble) and 16 + i (high)
      const I raw = V::u8(qs + v * V::W);
      q[v] = V::band(raw, V::seti(15));
      q[NV / 2 + v] = V::shr(raw, 4);
    }
    if constexpr (FIVE) {  // bit i of h -> 16 in weight i's lane
      const I hv = V::seti(static_cast<int>(h)), h4 = V::seti(static_cast<int>(h << 4));
      for (int v = 0; v < NV; ++v) {
        const int first = v * V::W;  // the lane's bit moved to bit 4 (the first vector from h << 4: no negative shift)
        const I bit = first == 0 ? V::shrv(h4, V::iota(0)) : V::shrv(hv, V::iota(first - 4));
        q[v] = V::bor(q[v], V::band(bit, V::seti(16)));
      }
    }
    for (int v = 0; v < NV; ++v) w[v] = V::cvt(q[v]);
  }
}

// Q6_K unit u (0..3): quarters u & 1 (low nibbles) and (u & 1) + 2 (high) of half u >> 1, as 2 * 32 / W vectors;
// returns their sub-blocks.
template <class V>
static inline std::pair<int, int> kq_unit_q6k(const uint8_t* p, int u, typename V::F* w) {
  constexpr int NV = 32 / V::W;
  using I = typename V::I;
  const int n = u >> 1, part = u & 1;
  const uint8_t* ql = p + 64 * n + 32 * part;
  const uint8_t* qh = p + 128 + 32 * n;
  if constexpr (kq_bytewise<V>) {
    kq_q6k_unit_v8(ql, qh, part, w);
  } else {
    for (int v = 0; v < NV; ++v) {
      const I l = V::u8(ql + v * V::W), h = V::shr(V::u8(qh + v * V::W), 2 * part);
      const I a = V::bor(V::band(l, V::seti(15)), V::band(V::shl(h, 4), V::seti(0x30)));
      const I b = V::bor(V::shr(l, 4), V::band(h, V::seti(0x30)));
      w[v] = V::cvt(V::sub(a, V::seti(32)));
      w[NV + v] = V::cvt(V::sub(b, V::seti(32)));
    }
  }
  return {4 * n + part, 4 * n + part + 2};
}

// Q4_K / Q5_K unit u (0..3): 32 bytes of nibbles, sub-block 2u in the low and 2u + 1 in the high halves (Q5_K: and
// bits 2u, 2u + 1 of the 32 fifth-bit bytes), as 2 * 32 / W vectors; returns their sub-blocks.
template <bool FIVE, class V>
static inline std::pair<int, int> kq_unit_k45(const uint8_t* p, int u, typename V::F* w) {
  constexpr int NV = 32 / V::W;
  using I = typename V::I;
  const uint8_t* qs = p + (FIVE ? 48 : 16) + 32 * u;
  if constexpr (FIVE && kq_bytewise<V>) {
    kq_q5k_unit_v8(qs, p + 16, u, w);
  } else {
    for (int v = 0; v < NV; ++v) {
      const I raw = V::u8(qs + v * V::W);
      I lo = V::band(raw, V::seti(15)), hi = V::shr(raw, 4);
      if constexpr (FIVE) {
        const I h = V::shr(V::u8(p + 16 + v * V::W), 2 * u);
        lo = V::bor(lo, V::band(V::shl(h, 4), V::seti(16)));
        hi = V::bor(hi, V::band(V::shl(h, 3), V::seti(16)));
      }
      w[v] = V::cvt(lo);
      w[NV + v] = V::cvt(hi);
    }
  }
  return {2 * u, 2 * u + 1};
}

template <int64_t TYPE, class V>
static inline std::pair<int, int> kq_unit_k(const uint8_t* p, int u, typename V::F* w) {
  if constexpr (TYPE == KQ_Q6_K) return kq_unit_q6k<V>(p, u, w);
  else return kq_unit_k45<TYPE == KQ_Q5_K, V>(p, u, w);
}

// acc[r] += sub-block . x[r]: each group's sum of code * x scaled once; where a vector is a whole group (Q6_K on
// AVX-512) the codes are scaled instead (exact products), shared by the R rows.
template <class V, int GS, int R>
static inline void kq_sub_dot(typename V::F* w, const float* sc, const float* x, int64_t kp, typename V::F* acc) {
  constexpr int NV = 32 / V::W, VG = GS / V::W;
  if constexpr (VG == 1) {
    for (int v = 0; v < NV; ++v) w[v] = V::mul(w[v], V::set1(sc[v]));
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) acc[r] = V::fma(w[v], V::load(x + r * kp + v * V::W), acc[r]);
  } else {
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < NV / VG; ++g) {
        typename V::F d = V::mul(w[g * VG], V::load(x + r * kp + g * GS));
        for (int v = 1; v < VG; ++v) d = V::fma(w[g * VG + v], V::load(x + r * kp + g * GS + v * V::W), d);
        acc[r] = V::fma(d, V::set1(sc[g]), acc[r]);
      }
  }
}

template <int64_t TYPE, class V, int R>
static void kq_row_dot_vec(const uint8_t* row, const KqActs& a, const float* x, const float* sums, float* res) {
  using Fm = KqFmt<TYPE>;
  constexpr int NV = 32 / V::W, SPG = 32 / Fm::GS;  // vectors per sub-block, scales per sub-block
  alignas(32) float sc[16], mn[8];
  typename V::F acc[R];
  __m256 macc[R];
  for (int r = 0; r < R; ++r) { acc[r] = V::zero(); macc[r] = _mm256_setzero_ps(); }
  for (int64_t k0 = 0; k0 < a.k; k0 += KQ_TILE) {
    const uint8_t* p = row + k0 / Fm::QK * Fm::BYTES;
    const int nsub = Fm::QK == KQ_TILE ? 8 : kq_nsub(a.k, k0);
    kq_tile_scales<TYPE>(p, nsub, sc, mn);
    const float* xt = x + k0;
    if constexpr (Fm::QK == 32) {
      for (int s = 0; s < nsub; ++s) {
        typename V::F w[NV];
        kq_unit_legacy<TYPE, V>(p + s * Fm::BYTES, w);
        kq_sub_dot<V, Fm::GS, R>(w, sc + s * SPG, xt + 32 * s, a.kp, acc);
      }
    } else {
      for (int u = 0; u < 4; ++u) {
        typename V::F w[2 * NV];
        const auto [sa, sb] = kq_unit_k<TYPE, V>(p, u, w);
        kq_sub_dot<V, Fm::GS, R>(w, sc + sa * SPG, xt + 32 * sa, a.kp, acc);
        kq_sub_dot<V, Fm::GS, R>(w + NV, sc + sb * SPG, xt + 32 * sb, a.kp, acc);
      }
    }
    if constexpr (Fm::MIN)
      for (int r = 0; r < R; ++r)
        macc[r] = _mm256_fmadd_ps(_mm256_load_ps(mn), _mm256_loadu_ps(sums + r * a.sp + k0 / 32), macc[r]);
  }
  for (int r = 0; r < R; ++r) res[r] = V::sum(acc[r]) + kq_hsum8(macc[r]);
}
#endif

// ---- the plain C++ GEMM (no AVX2): a decoded tile at a time ----

template <int64_t TYPE, int R>
static void kq_row_dot_plain(const uint8_t* row, const KqActs& a, const float* x, const float* sums, float* res) {
  using F = KqFmt<TYPE>;
  KqTile t;
  float acc[R] = {}, macc[R] = {};
  for (int64_t k0 = 0; k0 < a.k; k0 += KQ_TILE) {
    const int nsub = kq_nsub(a.k, k0);
    kq_decode<TYPE>(row, k0, nsub, t);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * a.kp + k0;
      for (int g = 0; g < 32 * nsub / F::GS; ++g) {
        float d = 0.f;
        for (int j = 0; j < F::GS; ++j) d += static_cast<float>(t.q[g * F::GS + j]) * xr[g * F::GS + j];
        acc[r] += d * t.scale[g];
      }
      if (F::MIN)
        for (int s = 0; s < 8; ++s) macc[r] += t.mn[s] * sums[r * a.sp + k0 / 32 + s];
    }
  }
  for (int r = 0; r < R; ++r) res[r] = acc[r] + macc[r];
}

// res[r] = row . x[r] for R activation rows at x + r * kp (sums: their sub-block sums at sums + r * sp).
template <int64_t TYPE, int R>
static inline void kq_row_dot(const uint8_t* row, const KqActs& a, const float* x, const float* sums, float* res) {
#if defined(__AVX512F__)
  kq_row_dot_vec<TYPE, KqV16, R>(row, a, x, sums, res);
#elif defined(__AVX2__) && defined(__FMA__)
  kq_row_dot_vec<TYPE, KqV8, R>(row, a, x, sums, res);
#else
  kq_row_dot_plain<TYPE, R>(row, a, x, sums, res);
#endif
}

// ---- the GEMM over a list of row segments ----

// One segment of the weight: rows of one type, written to output columns col .. col + rows.
struct KqSegment {
  const uint8_t* data = nullptr;
  int64_t rows = 0, row_bytes = 0, type = 0, col = 0;
};

// Output rows n0 .. n1 of a segment for every activation row: up to 4 activation rows per pass over a weight row
// (larger M in passes; a task's 16 weight rows stay in cache across the passes).
template <int64_t TYPE>
static void kq_rows(const KqSegment& s, int64_t n0, int64_t n1, const KqActs& a, float* out, int64_t ldo) {
  float res[4];
  for (int64_t r0 = 0; r0 < a.rows; r0 += 4) {
    const int64_t R = std::min<int64_t>(4, a.rows - r0);
    const float* x = a.x.data() + r0 * a.kp;
    const float* sums = a.sums.data() + r0 * a.sp;
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = s.data + n * s.row_bytes;
      switch (R) {
        case 4: kq_row_dot<TYPE, 4>(row, a, x, sums, res); break;
        case 3: kq_row_dot<TYPE, 3>(row, a, x, sums, res); break;
        case 2: kq_row_dot<TYPE, 2>(row, a, x, sums, res); break;
        default: kq_row_dot<TYPE, 1>(row, a, x, sums, res); break;
      }
      for (int64_t r = 0; r < R; ++r) out[(r0 + r) * ldo + s.col + n] = res[r];
    }
  }
}

// f(std::integral_constant<int64_t, TYPE>()) for a segment's type: the one list of the types the kernels run (kq_segments
// refuses the others), so each per-type entry point below is a single call.
template <typename F>
static void kq_with_type(int64_t type, F&& f) {
  switch (type) {
    case KQ_Q4_0: f(std::integral_constant<int64_t, KQ_Q4_0>()); break;
    case KQ_Q4_1: f(std::integral_constant<int64_t, KQ_Q4_1>()); break;
    case KQ_Q5_0: f(std::integral_constant<int64_t, KQ_Q5_0>()); break;
    case KQ_Q5_1: f(std::integral_constant<int64_t, KQ_Q5_1>()); break;
    case KQ_Q8_0: f(std::integral_constant<int64_t, KQ_Q8_0>()); break;
    case KQ_Q4_K: f(std::integral_constant<int64_t, KQ_Q4_K>()); break;
    case KQ_Q5_K: f(std::integral_constant<int64_t, KQ_Q5_K>()); break;
    case KQ_Q6_K: f(std::integral_constant<int64_t, KQ_Q6_K>()); break;
    default: break;  // refused by kq_segments
  }
}

static void kq_rows_any(const KqSegment& s, int64_t n0, int64_t n1, const KqActs& a, float* out, int64_t ldo) {
  kq_with_type(s.type, [&](auto t) { kq_rows<decltype(t)::value>(s, n0, n1, a, out, ldo); });
}

// The segments as the kernel reads them, each checked against its type and K.
static std::vector<KqSegment> kq_segments(const std::vector<at::Tensor>& raws, const std::vector<int64_t>& types,
                                          int64_t k) {
  TORCH_CHECK(!raws.empty() && raws.size() == types.size(), "gguf: one type per segment, at least one segment");
  std::vector<KqSegment> segs;
  int64_t col = 0;
  for (size_t i = 0; i < raws.size(); ++i) {
    const at::Tensor& r = raws[i];
    const auto [qk, bytes] = kq_block_size(types[i]);
    TORCH_CHECK(qk > 0, "gguf: ggml type ", types[i], " is not one this kernel runs");
    TORCH_CHECK(k > 0 && k % qk == 0, "gguf: K = ", k, " is not a multiple of the type's ", qk, "-weight block");
    TORCH_CHECK(r.dim() == 2 && r.scalar_type() == at::kByte && r.is_contiguous(),
                "gguf: each segment is a contiguous uint8 tensor [rows, row_bytes]");
    TORCH_CHECK(r.size(1) == k / qk * bytes, "gguf: segment ", i, " has ", r.size(1), " bytes per row, its type needs ",
                k / qk * bytes, " for K = ", k);
    segs.push_back({r.data_ptr<uint8_t>(), r.size(0), r.size(1), types[i], col});
    col += r.size(0);
  }
  return segs;
}

// Tasks of up to 16 rows of one segment, in weight order (each thread streams rows that follow each other).
static std::vector<std::array<int64_t, 3>> kq_tasks(const std::vector<KqSegment>& segs) {
  std::vector<std::array<int64_t, 3>> tasks;
  for (size_t i = 0; i < segs.size(); ++i)
    for (int64_t n0 = 0; n0 < segs[i].rows; n0 += 16)
      tasks.push_back({static_cast<int64_t>(i), n0, std::min<int64_t>(segs[i].rows, n0 + 16)});
  return tasks;
}

static void kq_gemm(const KqActs& a, const std::vector<KqSegment>& segs, float* out, int64_t ldo) {
  const auto tasks = kq_tasks(segs);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) kq_rows_any(segs[tasks[t][0]], tasks[t][1], tasks[t][2], a, out, ldo);
  });
}

static inline int64_t kq_total_rows(const std::vector<KqSegment>& segs) { return segs.back().col + segs.back().rows; }

// f(T()) for the activations' element type T (float, at::BFloat16, at::Half): each GEMM's activation builder for
// that type; any other dtype is refused, naming the GEMM `op`.
template <typename F>
static auto kq_with_act_type(const at::Tensor& x, const char* op, F&& f) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
              ": activations must be float32, bfloat16 or float16");
  if (t == at::kBFloat16) return f(at::BFloat16());
  if (t == at::kHalf) return f(at::Half());
  return f(float());
}

// x [M, K] (float32 / bfloat16 / float16) -> [M, N] in x's dtype, accumulated in float32; N = the segments' rows.
static at::Tensor gguf_linear(const at::Tensor& x_in, const std::vector<at::Tensor>& raws,
                              const std::vector<int64_t>& types, int64_t k) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "gguf_linear: x [M, K] with K = ", k);
  const auto segs = kq_segments(raws, types, k);
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const KqActs a = kq_with_act_type(x, "gguf_linear", [&](auto t) { return kq_acts<decltype(t)>(x); });
  const int64_t N = kq_total_rows(segs);
  at::Tensor out = at::empty({x.size(0), N}, x.options().dtype(at::kFloat));
  kq_gemm(a, segs, out.data_ptr<float>(), N);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());  // one rounding, as a cast in the loop would
}

// ---- de-quantization ----

// Row n of a segment as K float32 weights.
static void kq_dequantize_row_any(const KqSegment& s, int64_t n, int64_t k, float* dst) {
  const uint8_t* row = s.data + n * s.row_bytes;
  kq_with_type(s.type, [&](auto t) { kq_dequantize_row<decltype(t)::value>(row, k, dst); });
}

// Output rows c0 .. c1 of the whole weight (the segments' rows in order: a span may cross segments) as float32
// [c1 - c0, k] at dst, the threads splitting the rows.
static void kq_dequantize_span(const std::vector<KqSegment>& segs, int64_t c0, int64_t c1, int64_t k, float* dst) {
  at::parallel_for(c0, c1, 16, [&](int64_t b, int64_t e) {
    for (const KqSegment& s : segs) {
      const int64_t lo = std::max(b, s.col), hi = std::min(e, s.col + s.rows);
      for (int64_t n = lo; n < hi; ++n) kq_dequantize_row_any(s, n - s.col, k, dst + (n - c0) * k);
    }
  });
}

// The segments' weights as float32 [N, K], bit for bit what gguf-py's dequantize gives.
static at::Tensor gguf_dequantize(const std::vector<at::Tensor>& raws, const std::vector<int64_t>& types, int64_t k) {
  const auto segs = kq_segments(raws, types, k);
  at::Tensor out = at::empty({kq_total_rows(segs), k}, at::kFloat);
  kq_dequantize_span(segs, 0, out.size(0), k, out.data_ptr<float>());
  return out;
}

// ---- the large-M GEMM: panels of weight rows de-quantized, then a float32 matmul ----
//
// Each thread takes its own run of panels and, per panel, de-quantizes the rows into its own buffer and multiplies
// every activation row by them (a one-thread matmul, as BLAS runs inside a parallel region), writing that panel's
// output columns. Measured on a 2-core AVX2 CPU, this beat de-quantizing a shared multi-MB chunk with both threads
// and then a two-thread matmul of it by 20-50% at M <= 128 (no hand-off of the rows between cores, no waits between
// the two steps) and was within a few percent of it at M = 512.

// Rows per panel: a float32 buffer of about KQ_PANEL_BYTES (panels of 0.5 to 2 MB measured alike, at K = 2048 and
// M = 1..512; 1 MB stays in L3 while the matmul reads it), at least 64 rows so a long K still gives the matmul a
// wide block, but no more than splits the rows over all the threads.
constexpr int64_t KQ_PANEL_BYTES = 1 << 20;

// The panel count is a multiple of the thread count, so that every thread gets as many (7 panels of 448 rows over
// two threads left one idle for a seventh of the call).
static int64_t kq_panel_rows(int64_t n, int64_t k, int64_t threads) {
  const int64_t wanted = std::max<int64_t>(64, KQ_PANEL_BYTES / (4 * k) / 16 * 16);
  const int64_t panels = ((n + wanted - 1) / wanted + threads - 1) / threads * threads;
  return std::max<int64_t>(16, ((n + panels - 1) / panels + 15) / 16 * 16);
}

// The calling thread's panel buffer, kept between calls (a panel's worth per thread that ever ran the large-M
// GEMM): a fresh multi-MB allocation would be paid in page faults on every call.
static float* kq_panel_buffer(int64_t floats) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < floats) buf.resize(floats);
  return buf.data();
}

// out[:, c0 : c0 + rows] = x @ W[c0 : c0 + rows].T, the rows de-quantized into buf first.
static void kq_panel(const std::vector<KqSegment>& segs, const at::Tensor& x, at::Tensor& out, int64_t c0,
                     int64_t rows, float* buf) {
  const int64_t k = x.size(1);
  for (const KqSegment& s : segs) {  // a panel may cross segments
    const int64_t lo = std::max(c0, s.col), hi = std::min(c0 + rows, s.col + s.rows);
    for (int64_t n = lo; n < hi; ++n) kq_dequantize_row_any(s, n - s.col, k, buf + (n - c0) * k);
  }
  const at::Tensor w = at::from_blob(buf, {rows, k}, at::TensorOptions().dtype(at::kFloat));
  at::Tensor cols = out.narrow(1, c0, rows);  // row stride N: BLAS writes it in place
  at::mm_out(cols, x, w.t());
}

// x [M, K] (float32 / bfloat16 / float16) -> [M, N] in x's dtype, for large M (prefill): each weight is de-quantized
// once per call (bit for bit dequantize_gguf's) and the float32 matmul does the rest, where gguf_linear decodes it
// once per 4 activation rows. At small M gguf_linear is faster (it reads the weight once, as stored); the caller's
// per-CPU calibration picks between the two per batch size.
static at::Tensor gguf_linear_tiled(const at::Tensor& x_in, const std::vector<at::Tensor>& raws,
                                    const std::vector<int64_t>& types, int64_t k) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "gguf_linear_tiled: x [M, K] with K = ", k);
  const auto segs = kq_segments(raws, types, k);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "gguf_linear_tiled: activations must be float32, bfloat16 or float16");
  // mm takes any strides; detached, as gguf_linear's raw reads are (an out= matmul refuses inputs needing grad)
  const at::Tensor x = (dtype == at::kFloat ? x_in : x_in.to(at::kFloat)).detach();
  const int64_t N = kq_total_rows(segs), panel = kq_panel_rows(N, k, at::get_num_threads());
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  const at::ThreadLocalState tls;  // the caller's inference / grad mode for the matmuls in the worker threads
  at::parallel_for(0, (N + panel - 1) / panel, 1, [&](int64_t p0, int64_t p1) {
    at::ThreadLocalStateGuard guard(tls);
    float* buf = kq_panel_buffer(panel * k);
    for (int64_t p = p0; p < p1; ++p) kq_panel(segs, x, out, p * panel, std::min(panel, N - p * panel), buf);
  });
  return dtype == at::kFloat ? out : out.to(dtype);  // one rounding, as gguf_linear's
}

}  // namespace
