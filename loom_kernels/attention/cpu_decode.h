// Paged decode attention over the KV cache's blocks: `decode<T, C>` (queries and output of type T, the cache of type
// C: the same, or float16 / bfloat16 under float32 queries), used by the paged-decode extension (cpu_decode.cpp) and
// compiled into the decode stack (fused_cpu/decode_stack.cpp) too. With a sliding `window` (> 0) each query reads
// only its sequence's last `window` tokens, positions `first .. len - 1`.
#pragma once

#include <algorithm>
#include <type_traits>

#include "cpu/prelude.h"

namespace {

// Rows of one head are strided through the paged cache (other heads and blocks between them): the hardware
// prefetcher does not follow, and without this the loops wait on memory (4.6 GB/s of a ~30 GB/s core, measured).
constexpr int64_t kAhead = 8;
template <typename T>
static inline void prefetch_row(const T* p, int64_t n) {
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + off, 0, 3);
}

// One (sequence, KV head) with the group size and head dim known at compile time: the group's queries stay in
// registers and every loop unrolls (2x faster than the generic loop below on 9/3 heads x 64, measured).
template <typename T, typename C, int G, int D>
static void decode_item(const T* qrow, int64_t q_sh, const C* kp, const C* vp, const int32_t* table, int64_t first,
                        int64_t len, int64_t bs, int64_t c_sn, int64_t c_st, int64_t v_sn, int64_t v_st, float scale,
                        std::vector<float>& scores_buf, T* out) {
  float qf[G][D], acc[G][D], row[D];
  for (int g = 0; g < G; ++g)
    for (int d = 0; d < D; ++d) qf[g][d] = widen(qrow[g * q_sh + d]) * scale;
  const int64_t n = len - first;
  scores_buf.resize(G * n);
  float* __restrict scores = scores_buf.data();  // scores[g * n + t - first]
  for (int64_t t = first; t < len; ++t) {
    const C* __restrict k = kp + table[t / bs] * c_sn + (t % bs) * c_st;
    if (t + kAhead < len) prefetch_row(kp + table[(t + kAhead) / bs] * c_sn + ((t + kAhead) % bs) * c_st, D);
    widen_row(k, row, D);
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += qf[g][d] * row[d];
      scores[g * n + t - first] = s;
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* sg = scores + g * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, sg[i]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) { sg[i] = expf(sg[i] - m); sum += sg[i]; }
    inv[g] = n > 0 ? 1.f / sum : 0.f;
    for (int d = 0; d < D; ++d) acc[g][d] = 0.f;
  }
  for (int64_t t = first; t < len; ++t) {
    const C* __restrict v = vp + table[t / bs] * v_sn + (t % bs) * v_st;
    if (t + kAhead < len) prefetch_row(vp + table[(t + kAhead) / bs] * v_sn + ((t + kAhead) % bs) * v_st, D);
    widen_row(v, row, D);
    for (int g = 0; g < G; ++g) {
      const float p = scores[g * n + t - first];
      for (int d = 0; d < D; ++d) acc[g][d] += p * row[d];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(acc[g][d] * inv[g]);
}

template <typename T, typename C, int D>
static bool decode_fixed(int64_t G, const T* qrow, int64_t q_sh, const C* kp, const C* vp, const int32_t* table,
                         int64_t first, int64_t len, int64_t bs, int64_t c_sn, int64_t c_st, int64_t v_sn,
                         int64_t v_st, float scale, std::vector<float>& buf, T* out) {
  switch (G) {
    case 1: decode_item<T, C, 1, D>(qrow, q_sh, kp, vp, table, first, len, bs, c_sn, c_st, v_sn, v_st, scale, buf, out); return true;
    case 2: decode_item<T, C, 2, D>(qrow, q_sh, kp, vp, table, first, len, bs, c_sn, c_st, v_sn, v_st, scale, buf, out); return true;
    case 3: decode_item<T, C, 3, D>(qrow, q_sh, kp, vp, table, first, len, bs, c_sn, c_st, v_sn, v_st, scale, buf, out); return true;
    case 4: decode_item<T, C, 4, D>(qrow, q_sh, kp, vp, table, first, len, bs, c_sn, c_st, v_sn, v_st, scale, buf, out); return true;
    case 6: decode_item<T, C, 6, D>(qrow, q_sh, kp, vp, table, first, len, bs, c_sn, c_st, v_sn, v_st, scale, buf, out); return true;
    case 8: decode_item<T, C, 8, D>(qrow, q_sh, kp, vp, table, first, len, bs, c_sn, c_st, v_sn, v_st, scale, buf, out); return true;
    default: return false;
  }
}

template <typename T, typename C>
static void decode(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bt,
                   const at::Tensor& sl, double scale, at::Tensor& out, int64_t window = 0) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = kc.size(1), Hkv = kc.size(2), G = H / Hkv;
  const T* qp = q.data_ptr<T>();
  const C* kp = kc.data_ptr<C>();
  const C* vp = vc.data_ptr<C>();
  T* op = out.data_ptr<T>();
  const int32_t* btp = bt.data_ptr<int32_t>();
  const int32_t* slp = sl.data_ptr<int32_t>();
  const int64_t q_sb = q.stride(0), q_sh = q.stride(1);
  const int64_t c_sn = kc.stride(0), c_st = kc.stride(1), c_sh = kc.stride(2);
  const int64_t v_sn = vc.stride(0), v_st = vc.stride(1), v_sh = vc.stride(2);
  const int64_t bt_s = bt.stride(0);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), kf(D), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t len = slp[b];
      const int64_t first = window > 0 ? std::max<int64_t>(len - window, 0) : 0, n = len - first;
      const T* qrow = qp + b * q_sb + h * G * q_sh;
      T* orow = op + b * H * D + h * G * D;
      const float sc = static_cast<float>(scale);
      if (D == 64 && decode_fixed<T, C, 64>(G, qrow, q_sh, kp + h * c_sh, vp + h * v_sh, btp + b * bt_s, first, len, bs,
                                         c_sn, c_st, v_sn, v_st, sc, scores, orow))
        continue;
      if (D == 128 && decode_fixed<T, C, 128>(G, qrow, q_sh, kp + h * c_sh, vp + h * v_sh, btp + b * bt_s, first, len,
                                           bs, c_sn, c_st, v_sn, v_st, sc, scores, orow))
        continue;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[g * D + d] = widen(qp[b * q_sb + (h * G + g) * q_sh + d]) * static_cast<float>(scale);
      scores.assign(G * n, 0.f);
      for (int64_t t = first; t < len; ++t) {
        const C* k = kp + btp[b * bt_s + t / bs] * c_sn + (t % bs) * c_st + h * c_sh;
        if (t + kAhead < len)
          prefetch_row(kp + btp[b * bt_s + (t + kAhead) / bs] * c_sn + ((t + kAhead) % bs) * c_st + h * c_sh, D);
        widen_row(k, kf.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = &qf[g * D];
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
          scores[g * n + t - first] = s;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::vector<float> inv(G, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        float* sg = &scores[g * n];
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) m = std::max(m, sg[t]);
        float sum = 0.f;
        // vectorized through glibc's libmvec (expf x16 with AVX512); scalar exp dominated the whole kernel
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) { sg[t] = expf(sg[t] - m); sum += sg[t]; }
        inv[g] = n > 0 ? 1.f / sum : 0.f;
      }
      for (int64_t t = first; t < len; ++t) {
        const C* v = vp + btp[b * bt_s + t / bs] * v_sn + (t % bs) * v_st + h * v_sh;
        if (t + kAhead < len)
          prefetch_row(vp + btp[b * bt_s + (t + kAhead) / bs] * v_sn + ((t + kAhead) % bs) * v_st + h * v_sh, D);
        widen_row(v, kf.data(), D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * n + t - first];
          float* a = &acc[g * D];
          for (int64_t d = 0; d < D; ++d) a[d] += p * kf[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          op[b * H * D + (h * G + g) * D + d] = static_cast<T>(acc[g * D + d] * inv[g]);
    }
  });
}

// The cache types a query type reads: its own, and float16 / bfloat16 under float32 queries (a reduced-precision KV
// cache beside float32 activations).
static inline bool cache_readable(at::ScalarType cache, at::ScalarType queries) {
  return cache == queries || (queries == at::kFloat && (cache == at::kHalf || cache == at::kBFloat16));
}

// f(C()) for the element type C of a cache that queries of type T read (see cache_readable).
template <typename T, typename F>
static void with_cache_type(at::ScalarType cache, F&& f) {
  if (cache == c10::CppTypeToScalarType<T>::value) return f(T());
  if constexpr (std::is_same_v<T, float>) {
    if (cache == at::kHalf) return f(at::Half());
    if (cache == at::kBFloat16) return f(at::BFloat16());
  }
  TORCH_CHECK(false, "paged decode: the cache is of the query dtype, or float16 / bfloat16 under float32 queries");
}

template <typename T>
static void decode_any_cache(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& bt,
                             const at::Tensor& sl, double scale, at::Tensor& out, int64_t window = 0) {
  TORCH_CHECK(vc.scalar_type() == kc.scalar_type(), "paged decode: K and V caches of one dtype");
  with_cache_type<T>(kc.scalar_type(), [&](auto c) { decode<T, decltype(c)>(q, kc, vc, bt, sl, scale, out, window); });
}

}  // namespace
