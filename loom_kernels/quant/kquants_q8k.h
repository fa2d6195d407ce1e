// The large-M GEMM of the K-quants (Q4_K, Q5_K, Q6_K) against int8 activations quantized per 256 values, as
// llama.cpp runs its K-quant prompts (its Q8_K): each superblock's integer sub-block scales enter the integer dot
// products, so a whole 256-weight superblock of one activation row and one weight row sums in int32 (vpmaddubsw of
// codes and activations, vpmaddwd with the scales) and is scaled once by the two superblock d's. Against the
// per-32 kernel (kquants_q8.h, one float product per sub-block and pair of rows) that is ~3 integer ops per 32
// weights and pair.
//
// Each thread takes panels of weight rows of one segment and unpacks them once into a reused buffer (codes as bytes,
// scales as bytes per 16 weights, the superblock d's), then runs every activation row against the panel in blocks of
// 4 activation rows x 2 weight rows: 8 int32 accumulators in registers, the weights' codes and scales loaded once per
// block for the 4 rows, the activations once for the 2. The mins (Q4_K / Q5_K's dmin * m per 32 weights) do not fit
// the integer sums: they are one float32 matmul of the activations' de-quantized sums per 32 by the weights' mins
// after the panels. Q6_K's -32 per code is an integer term of its own: -32 * scale against the activations' code sums
// per 16, added to the same int32 sums.
//
// The result is the GEMM of the de-quantized weights with the de-quantized activations up to float32 summation order
// (the integer sums are exact: |code| <= 63 times |x| <= 127, pairs within int16, a superblock within int32).
#pragma once

#include "quant/kquants_q8.h"

namespace {

static inline bool q8k_type(int64_t type) { return type == KQ_Q4_K || type == KQ_Q5_K || type == KQ_Q6_K; }

// Activations per 256 values: codes [rows, k], each code sum per 16 [rows, tiles, 16], the de-quantized sums per 32
// (float32 [rows, k / 32], for the mins' matmul) and d (max|x| / 127) laid out for the 4 x 2 blocks: per 4 rows and
// tile, lane 2i + j holds row i's d.
struct Q8kActs {
  std::vector<int8_t> q;
  std::vector<int16_t> bsums;
  std::vector<float> dpair;
  at::Tensor sums;
  int64_t rows = 0, k = 0, tiles = 0;
};

template <typename T>
static void q8k_quantize_row(const T* x, int64_t tiles, int8_t* q, float* d, int16_t* bsums, float* sums) {
  alignas(32) float buf[256];
  for (int64_t t = 0; t < tiles; ++t) {
    float amax = 0.f;
    for (int j = 0; j < 256; ++j) {
      buf[j] = widen(x[256 * t + j]);
      amax = std::max(amax, std::fabs(buf[j]));
    }
    d[t] = amax / 127.f;
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    for (int s = 0; s < 8; ++s) {
      const auto [s0, s1] = kq8_codes32(buf + 32 * s, id, q + 256 * t + 32 * s);
      bsums[16 * t + 2 * s] = static_cast<int16_t>(s0);
      bsums[16 * t + 2 * s + 1] = static_cast<int16_t>(s1);
      sums[8 * t + s] = d[t] * static_cast<float>(s0 + s1);
    }
  }
}

template <typename T>
static Q8kActs q8k_acts(const at::Tensor& x) {
  Q8kActs a;
  a.rows = x.size(0); a.k = x.size(1); a.tiles = a.k / 256;
  a.q.resize(a.rows * a.k);
  a.bsums.resize(a.rows * a.tiles * 16);
  a.sums = at::empty({a.rows, a.k / 32}, at::kFloat);
  std::vector<float> d(a.rows * a.tiles);
  const T* p = x.data_ptr<T>();
  const int64_t sx = x.stride(0);
  float* sums = a.sums.data_ptr<float>();
  at::parallel_for(0, a.rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      q8k_quantize_row(p + r * sx, a.tiles, a.q.data() + r * a.k, d.data() + r * a.tiles,
                       a.bsums.data() + r * a.tiles * 16, sums + r * (a.k / 32));
  });
  a.dpair.assign((a.rows + 3) / 4 * a.tiles * 8, 0.f);
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t t = 0; t < a.tiles; ++t)
      for (int j = 0; j < 2; ++j) a.dpair[(r / 4 * a.tiles + t) * 8 + r % 4 * 2 + j] = d[r * a.tiles + t];
  return a;
}

// A panel of rows of one segment as the blocks read it: per row the k unsigned codes (Q4_K / Q5_K's 4 / 5 bits, Q6_K's
// 6 before its -32) and per 32 weights 16 int8 scales (8 for weights 0-15, 8 for 16-31: Q6_K's two 16-weight scales,
// or Q4_K / Q5_K's one twice); Q6_K's -32 * scale per 16 weights (int16 [rows, tiles, 16]); and the d's per pair of
// rows and tile, lane 2i + j holding row j's.
struct Q8kPanel {
  uint8_t* codes = nullptr;
  int8_t* scales = nullptr;
  int16_t* offsets = nullptr;
  float* dpair = nullptr;
  int64_t rows = 0, k = 0, tiles = 0;
};

static inline int64_t q8k_row_bytes(int64_t k) { return k + k / 2 + k / 256 * (32 + 32); }

// The calling thread's panel over its reused buffer (a fresh allocation per call would be paid in page faults).
static Q8kPanel q8k_panel_buffer(int64_t rows, int64_t k) {
  thread_local std::vector<uint8_t> buf;
  const int64_t tiles = k / 256, pairs = (rows + 1) / 2;
  const int64_t need = rows * k + rows * (k / 2) + rows * tiles * 32 + pairs * tiles * 32 + 64 * 4;
  if (static_cast<int64_t>(buf.size()) < need) buf.resize(need);
  auto align = [](uint8_t* p) { return p + ((64 - reinterpret_cast<uintptr_t>(p) % 64) % 64); };
  Q8kPanel w;
  w.rows = rows; w.k = k; w.tiles = tiles;
  w.codes = align(buf.data());
  w.scales = reinterpret_cast<int8_t*>(align(w.codes + rows * k));
  w.offsets = reinterpret_cast<int16_t*>(align(reinterpret_cast<uint8_t*>(w.scales) + rows * (k / 2)));
  w.dpair = reinterpret_cast<float*>(align(reinterpret_cast<uint8_t*>(w.offsets) + rows * tiles * 32));
  return w;
}

// dst[j] = src[j / PER] for j < 128: a sub-block's scales spread over the 16 bytes the block kernel reads per 32 weights.
template <int PER>
static inline void q8k_spread(const int8_t* src, int8_t* dst) {
#if defined(__AVX2__)
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  alignas(32) int8_t idx[32];
  for (int q = 0; q < 4; ++q) {
    for (int j = 0; j < 32; ++j) idx[j] = static_cast<int8_t>((32 * q + j) / PER);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32 * q),
                        _mm256_shuffle_epi8(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(idx))));
  }
#else
  for (int j = 0; j < 128; ++j) dst[j] = src[j / PER];
#endif
}

// Panel row r from a segment row; its mins (-dmin * m per 32 weights, Q4_K / Q5_K) to mins[0 .. k / 32].
template <int64_t TYPE>
static void q8k_unpack_row(const uint8_t* row, Q8kPanel& w, int64_t r, float* mins) {
  using Fm = KqFmt<TYPE>;
  for (int64_t t = 0; t < w.tiles; ++t) {
    const uint8_t* p = row + t * Fm::BYTES;
    uint8_t* codes = w.codes + r * w.k + 256 * t;
#if defined(__AVX2__) && defined(__FMA__)
    __m256i v[8];
    kq8_codes<TYPE>(p, 8, v);
    for (int s = 0; s < 8; ++s) _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 32 * s), v[s]);
#else
    KqTile tile;
    kq_decode<TYPE>(row, 256 * t, 8, tile);
    for (int j = 0; j < 256; ++j) codes[j] = static_cast<uint8_t>(tile.q[j] + (TYPE == KQ_Q6_K ? 32 : 0));
#endif
    int8_t* sc = w.scales + r * (w.k / 2) + 128 * t;
    float d;
    if constexpr (TYPE == KQ_Q6_K) {
      const int8_t* s6 = reinterpret_cast<const int8_t*>(p + 192);
      q8k_spread<8>(s6, sc);
      for (int g = 0; g < 16; ++g) w.offsets[(r * w.tiles + t) * 16 + g] = static_cast<int16_t>(-32 * s6[g]);
      d = kq_half(p + 208);
    } else {
      uint32_t u[4];
      kq_k4_unpack(p + 4, u);
      const uint8_t* b = reinterpret_cast<const uint8_t*>(u);
      q8k_spread<16>(reinterpret_cast<const int8_t*>(b), sc);  // 6-bit scales: the same bits as int8
      const float dmin = kq_half(p + 2);
      for (int s = 0; s < 8; ++s) mins[8 * t + s] = -dmin * static_cast<float>(b[8 + s]);
      d = kq_half(p);
    }
    for (int i = 0; i < 4; ++i) w.dpair[(r / 2 * w.tiles + t) * 8 + 2 * i + r % 2] = d;
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// out[i * ldo + j] = activation row m0 + i . panel row r0 + j, for MB x NB rows (m0 a multiple of 4, r0 of 2).
template <int64_t TYPE, int MB, int NB>
static void q8k_block(const Q8kPanel& w, int64_t r0, const Q8kActs& a, int64_t m0, float* out, int64_t ldo) {
  __m256 accf = _mm256_setzero_ps();
  for (int64_t t = 0; t < a.tiles; ++t) {
    __m256i acc[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_si256();
    const uint8_t* wc = w.codes + r0 * w.k + 256 * t;
    const int8_t* ws = w.scales + r0 * (w.k / 2) + 128 * t;
    const int8_t* xq = a.q.data() + m0 * a.k + 256 * t;
    for (int s = 0; s < 8; ++s) {
      __m256i wv[NB], sv[NB];
      for (int j = 0; j < NB; ++j) {
        wv[j] = kq_load32(wc + j * w.k + 32 * s);
        sv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ws + j * (w.k / 2) + 16 * s)));
      }
      for (int i = 0; i < MB; ++i) {
        const __m256i x = kq_load32(reinterpret_cast<const uint8_t*>(xq + i * a.k + 32 * s));
        for (int j = 0; j < NB; ++j)
          acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(_mm256_maddubs_epi16(wv[j], x), sv[j]));
      }
    }
    if constexpr (TYPE == KQ_Q6_K)
      for (int i = 0; i < MB; ++i) {
        const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bsums.data() + ((m0 + i) * a.tiles + t) * 16));
        for (int j = 0; j < NB; ++j) {
          const int16_t* off = w.offsets + ((r0 + j) * w.tiles + t) * 16;
          acc[i][j] = _mm256_add_epi32(acc[i][j],
                                       _mm256_madd_epi16(bs, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off))));
        }
      }
    __m256i v[8];
    for (int p = 0; p < 8; ++p) v[p] = _mm256_setzero_si256();
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) v[2 * i + j] = acc[i][j];
    const auto [lo, hi] = kq8_reduce(v);
    const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(a.dpair.data() + (m0 / 4 * a.tiles + t) * 8),
                                       _mm256_loadu_ps(w.dpair + (r0 / 2 * w.tiles + t) * 8));
    accf = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), scale, accf);
  }
  alignas(32) float res[8];
  _mm256_store_ps(res, accf);
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out[i * ldo + j] = res[2 * i + j];
}
#else
// Plain C++: the same sums, one pair of rows at a time.
template <int64_t TYPE, int MB, int NB>
static void q8k_block(const Q8kPanel& w, int64_t r0, const Q8kActs& a, int64_t m0, float* out, int64_t ldo) {
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      const uint8_t* wc = w.codes + (r0 + j) * w.k;
      const int8_t* ws = w.scales + (r0 + j) * (w.k / 2);
      const int8_t* xq = a.q.data() + (m0 + i) * a.k;
      float acc = 0.f;
      for (int64_t t = 0; t < a.tiles; ++t) {
        int32_t sum = 0;
        for (int h = 0; h < 16; ++h) {  // 16-weight halves of the sub-blocks
          int32_t dot = 0;
          for (int e = 0; e < 16; ++e) dot += int32_t(wc[256 * t + 16 * h + e]) * int32_t(xq[256 * t + 16 * h + e]);
          sum += dot * ws[128 * t + 8 * h];
          if (TYPE == KQ_Q6_K)
            sum += int32_t(a.bsums[((m0 + i) * a.tiles + t) * 16 + h]) * w.offsets[((r0 + j) * w.tiles + t) * 16 + h];
        }
        const float scale = a.dpair[(m0 / 4 * a.tiles + t) * 8 + 2 * i + j] * w.dpair[(r0 / 2 * w.tiles + t) * 8 + 2 * i + j];
        acc = std::fma(static_cast<float>(sum), scale, acc);
      }
      out[i * ldo + j] = acc;
    }
}
#endif

template <int64_t TYPE, int MB>
static inline void q8k_block_nb(const Q8kPanel& w, int64_t r0, int nb, const Q8kActs& a, int64_t m0, float* out,
                                int64_t ldo) {
  if (nb == 2) q8k_block<TYPE, MB, 2>(w, r0, a, m0, out, ldo);
  else q8k_block<TYPE, MB, 1>(w, r0, a, m0, out, ldo);
}

// Every activation row against the panel, written to out (the panel's first output column) with row stride ldo.
template <int64_t TYPE>
static void q8k_panel_gemm(const Q8kPanel& w, const Q8kActs& a, float* out, int64_t ldo) {
  for (int64_t m0 = 0; m0 < a.rows; m0 += 4) {
    const int64_t mb = std::min<int64_t>(4, a.rows - m0);
    for (int64_t r0 = 0; r0 < w.rows; r0 += 2) {
      const int nb = static_cast<int>(std::min<int64_t>(2, w.rows - r0));
      float* o = out + m0 * ldo + r0;
      switch (mb) {
        case 4: q8k_block_nb<TYPE, 4>(w, r0, nb, a, m0, o, ldo); break;
        case 3: q8k_block_nb<TYPE, 3>(w, r0, nb, a, m0, o, ldo); break;
        case 2: q8k_block_nb<TYPE, 2>(w, r0, nb, a, m0, o, ldo); break;
        default: q8k_block_nb<TYPE, 1>(w, r0, nb, a, m0, o, ldo); break;
      }
    }
  }
}

// Rows per panel: ~192 KB unpacked (it stays in L2 while every activation row runs against it), an even number from
// 2 to 64, no more than splits the segment over all the threads.
static int64_t q8k_panel_rows(int64_t seg_rows, int64_t k, int64_t threads) {
  const int64_t fit = std::max<int64_t>(2, std::min<int64_t>(64, (192 << 10) / q8k_row_bytes(k)) / 2 * 2);
  const int64_t per_thread = (seg_rows + threads - 1) / threads;
  return std::max<int64_t>(2, std::min(fit, (per_thread + 1) / 2 * 2));
}

// Panel tasks: (segment, first row, rows), in weight order.
static std::vector<std::array<int64_t, 3>> q8k_tasks(const std::vector<KqSegment>& segs, int64_t k) {
  std::vector<std::array<int64_t, 3>> tasks;
  for (size_t i = 0; i < segs.size(); ++i) {
    const int64_t p = q8k_panel_rows(segs[i].rows, k, at::get_num_threads());
    for (int64_t n0 = 0; n0 < segs[i].rows; n0 += p)
      tasks.push_back({static_cast<int64_t>(i), n0, std::min(p, segs[i].rows - n0)});
  }
  return tasks;
}

template <int64_t TYPE>
static void q8k_task(const KqSegment& s, int64_t n0, int64_t rows, const Q8kActs& a, float* out, int64_t ldo,
                     float* mins) {
  Q8kPanel w = q8k_panel_buffer(rows, a.k);
  if (rows % 2)  // the last pair's missing row: its d lanes meet zero sums, and must not be a stale NaN
    std::fill(w.dpair + rows / 2 * w.tiles * 8, w.dpair + (rows / 2 + 1) * w.tiles * 8, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    q8k_unpack_row<TYPE>(s.data + (n0 + r) * s.row_bytes, w, r, mins + (s.col + n0 + r) * (a.k / 32));
  q8k_panel_gemm<TYPE>(w, a, out + s.col + n0, ldo);
}

// x [M, K] (float32 / bfloat16 / float16) -> [M, N] in x's dtype, every segment a K-quant: gguf_linear with x
// quantized to int8 per 256 values, for large M.
static at::Tensor gguf_linear_q8k(const at::Tensor& x_in, const std::vector<at::Tensor>& raws,
                                  const std::vector<int64_t>& types, int64_t k) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "gguf_linear_q8k: x [M, K] with K = ", k);
  const auto segs = kq_segments(raws, types, k);
  bool any_min = false;
  for (const KqSegment& s : segs) {
    TORCH_CHECK(q8k_type(s.type), "gguf_linear_q8k runs the K-quants Q4_K, Q5_K and Q6_K; got ggml type ", s.type);
    any_min = any_min || s.type != KQ_Q6_K;
  }
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const Q8kActs a = kq_with_act_type(x, "gguf_linear_q8k", [&](auto t) { return q8k_acts<decltype(t)>(x); });
  const int64_t N = kq_total_rows(segs);
  at::Tensor out = at::empty({x.size(0), N}, x.options().dtype(at::kFloat));
  at::Tensor mins = at::zeros({N, k / 32}, at::kFloat);  // Q6_K rows stay 0
  const auto tasks = q8k_tasks(segs, k);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const KqSegment& s = segs[tasks[t][0]];
      kq_with_type(s.type, [&](auto c) {
        constexpr int64_t TYPE = decltype(c)::value;
        if constexpr (TYPE == KQ_Q4_K || TYPE == KQ_Q5_K || TYPE == KQ_Q6_K)
          q8k_task<TYPE>(s, tasks[t][1], tasks[t][2], a, o, N, mins.data_ptr<float>());
      });
    }
  });
  if (any_min) out.addmm_(a.sums, mins.t());
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace
