// A whole decode step of a Llama-family stack in one call (loom_kernels/fused_cpu/decode_stack.py): the layer loop
// around the RMSNorm / rotary, paged-attention and block-GEMM kernels of the other extensions, from their headers.
// Per layer it also runs the newer families' variations: q/k head norms (Qwen3), no rotary (SmolLM3's NoPE layers),
// partial rotary (Phi-3: a cos/sin table narrower than the head) and sliding windows (Mistral, Qwen2, Phi-3, ...);
// and Gemma 3's layer: norms on both sides of each sublayer (float32 weights 1 + w), GeGLU, two rotary tables.
#include <ATen/core/dispatch/Dispatcher.h>

#include "attention/cpu_decode.h"
#include "fused_cpu/cpu_ops.h"
#include "lora/cpu_lora.h"
#include "quant/blocks.h"
#include "quant/kquants.h"
#include "quant/kquants_q8.h"
#include "quant/kquants_q8k.h"

// One linear: kinds 0-5 hold their weight in a, b, c; kinds 6-9 (GGUF blocks: the small-M, the tiled large-M and the
// int8-activation GEMMs) in segs, one ggml type each. lora_a / lora_b / lora_meta: its LoRA slot stacks and their
// LoraMeta, if it carries adapters.
struct Lin {
  int64_t kind = 0, n = 0, k = 0, group = 0;
  at::Tensor a, b, c, bias, lora_a, lora_b, lora_meta;
  std::vector<at::Tensor> segs;
  std::vector<int64_t> types;
};

static at::Tensor packed_bf16_linear(const at::Tensor& x, const at::Tensor& w) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, c10::IValue(), std::string("none"),
                                 c10::impl::GenericList(c10::OptionalType::create(c10::NumberType::get())),
                                 std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

static at::Tensor base_linear(const at::Tensor& x, const Lin& l) {
  at::Tensor out;
  if (l.kind == 0) {  // int4pack: a = packed codes, b = scales/zeros [K_pad / group, N_pad, 2]
    at::Tensor f = x.scalar_type() == l.b.scalar_type() ? x : x.to(l.b.scalar_type());
    const int64_t k_pad = l.b.size(0) * l.group;
    if (k_pad != l.k) f = at::constant_pad_nd(f, {0, k_pad - l.k});
    out = at::_weight_int4pack_mm_for_cpu(f, l.a, l.group, l.b);
    if (out.size(1) != l.n) out = out.narrow(1, 0, l.n);
  } else if (l.kind == 1) {  // int8pack: a = codes [N, K_pad], b = per-row scale
    at::Tensor f = x.scalar_type() == l.b.scalar_type() ? x : x.to(l.b.scalar_type());
    if (l.a.size(1) != l.k) f = at::constant_pad_nd(f, {0, l.a.size(1) - l.k});
    out = at::_weight_int8pack_mm(f, l.a, l.b);
  } else if (l.kind == 4 || l.kind == 5) {  // GGUF blocks: a = codes, b = d, c = m (Q4)
    out = block_linear(x, l.a, l.b, l.kind == 4 ? l.c : l.b, l.kind - 4);
  } else if (l.kind == 6) {  // GGUF blocks as stored, any mix of the kquants types
    out = gguf_linear(x, l.segs, l.types, l.k);
  } else if (l.kind == 7) {  // the same weights, de-quantized a chunk at a time for a float32 matmul
    out = gguf_linear_tiled(x, l.segs, l.types, l.k);
  } else if (l.kind == 8) {  // the same weights against activations quantized to int8
    out = gguf_linear_q8(x, l.segs, l.types, l.k);
  } else if (l.kind == 9) {  // K-quants against activations quantized per 256, for large M
    out = gguf_linear_q8k(x, l.segs, l.types, l.k);
  } else if (l.kind == 2) {
    out = at::linear(x.scalar_type() == l.a.scalar_type() ? x : x.to(l.a.scalar_type()), l.a);
  } else {
    out = packed_bf16_linear(x.scalar_type() == at::kBFloat16 ? x : x.to(at::kBFloat16), l.a);
  }
  if (out.scalar_type() != x.scalar_type()) out = out.to(x.scalar_type());
  if (l.bias.defined()) out = out + l.bias.to(out.scalar_type());
  return out;
}

// The base product, then the adapter rows' deltas (`lora`: the step's rows by slot; empty in a base-only step).
template <typename T>
static at::Tensor apply_linear(const at::Tensor& x, const Lin& l, const LoraRows& lora) {
  at::Tensor out = base_linear(x, l);
  if (!lora.rows.empty() && l.lora_a.defined())
    lora_apply<T>(out, x, l.lora_a, l.lora_b, lora, {l.lora_meta.data_ptr<int32_t>(), l.lora_meta.size(1)});
  return out;
}

// act(gate) rounded to T, times up, rounded: the reference's two bf16/fp16 ops (silu_and_mul, gelu_tanh_and_mul).
template <typename T, typename Act>
static at::Tensor gated_mul(const at::Tensor& gu, int64_t inter, Act act) {
  const int64_t rows = gu.size(0), s0 = gu.stride(0);
  auto out = at::empty({rows, inter}, gu.options());
  const T* p = gu.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows * inter, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / inter, c = i % inter;
      const float a = widen(static_cast<T>(act(widen(p[r * s0 + c]))));
      o[i] = static_cast<T>(a * widen(p[r * s0 + inter + c]));
    }
  });
  return out;
}

template <typename T>
static at::Tensor silu_mul(const at::Tensor& gu, int64_t inter) {
  return gated_mul<T>(gu, inter, [](float g) { return g / (1.f + std::exp(-g)); });
}

// F.gelu(gate, approximate="tanh") * up
template <typename T>
static at::Tensor gelu_tanh_mul(const at::Tensor& gu, int64_t inter) {
  constexpr float beta = 0.7978845608028654f, kappa = 0.044715f;  // sqrt(2 / pi), as torch's tanh GELU
  return gated_mul<T>(gu, inter, [](float g) { return 0.5f * g * (1.f + std::tanh(beta * (g + kappa * g * g * g))); });
}

// Gemma's RMSNorm of each row of x [rows, D]: x * rsqrt(mean(x^2) + eps) * w1 in float32 (w1 = 1 + weight), rounded
// once to T; with `res` defined, res + that, rounded (a sublayer's output joining the residual stream).
template <typename T>
static void gemma_rms(const at::Tensor& x, const at::Tensor& w1, double eps, const at::Tensor& res, at::Tensor& out) {
  const int64_t rows = x.size(0), D = x.size(1), xs = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const float* wp = w1.data_ptr<float>();
  const T* rp = res.defined() ? res.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float ss = 0.f;
      for (int64_t d = 0; d < D; ++d) ss += widen(xp[r * xs + d]) * widen(xp[r * xs + d]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      for (int64_t d = 0; d < D; ++d) {
        const T n = static_cast<T>(widen(xp[r * xs + d]) * inv * wp[d]);
        op[r * D + d] = rp ? static_cast<T>(widen(rp[r * D + d]) + widen(n)) : n;
      }
    }
  });
}

// Row b of k/v [B, Hkv, D] (type T) into cache slot slots[b] (type C: T, or float16 / bfloat16 rounded to nearest
// even as torch's cast rounds); -1 skips the row.
template <typename T, typename C>
static void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& kc, at::Tensor& vc, const int64_t* slots) {
  const int64_t B = k.size(0), bs = kc.size(1), row = k.size(1) * k.size(2);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = slots[b];
    if (s < 0) continue;
    C* kd = kc.data_ptr<C>() + (s / bs) * kc.stride(0) + (s % bs) * kc.stride(1);
    C* vd = vc.data_ptr<C>() + (s / bs) * vc.stride(0) + (s % bs) * vc.stride(1);
    const T* ks = k.data_ptr<T>() + b * k.stride(0);
    const T* vs = v.data_ptr<T>() + b * v.stride(0);
    if constexpr (std::is_same_v<T, C>) {
      std::memcpy(kd, ks, row * sizeof(T));
      std::memcpy(vd, vs, row * sizeof(T));
    } else {
      for (int64_t i = 0; i < row; ++i) {
        kd[i] = static_cast<C>(widen(ks[i]));
        vd[i] = static_cast<C>(widen(vs[i]));
      }
    }
  }
}

// RMSNorm over each head of x [B, heads, D] (Qwen3's and Gemma's q/k norms): the reference's norm over
// [B * heads, D] rows, rounded to T as it rounds. Returns a new contiguous [B, heads, D]; x may be a strided view into
// the fused qkv.
template <typename T>
static at::Tensor head_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool gemma) {
  const at::Tensor rows = x.reshape({-1, x.size(2)});
  at::Tensor out = at::empty(rows.sizes(), x.options()), none;
  if (gemma) gemma_rms<T>(rows, w, eps, none, out);
  else rms<T>(rows, w, none, eps, out, none);
  return out.view(x.sizes());
}

// Per layer, beyond the plain Llama layer: q/k head norms (undefined: none), the rotary table (-1: none, SmolLM3's
// NoPE layers; 1: the second one, Gemma's local layers), the sliding window (0: full attention) and the KV group whose
// slots and block tables address its cache (a model mixing windowed and full layers: server/model/kv_layout.py).
struct LayerExtras {
  at::Tensor q_norm, k_norm;
  int64_t rope_table = 0;
  int64_t window = 0;
  int64_t kv_group = 0;
};

struct DecodeStack {
  std::vector<at::Tensor> norms, k_caches, v_caches;
  std::vector<Lin> lins;  // 4 per layer: qkv, o, gate_up, down
  std::vector<LayerExtras> extras;  // 1 per layer
  std::vector<at::Tensor> cos_sin;  // tables [positions, rotary_dim]: only the first rotary_dim features rotate
  int64_t H, Hkv, D;
  double eps, scale;
  bool gemma = false;  // Gemma 3's layer: norms (float32 1 + w) on both sides of each sublayer, GeGLU
  at::ScalarType x_dtype;  // the activations'; the caches hold it too, or float16 / bfloat16 under float32

  int64_t num_lora_slots = 0;  // the slot count of the linears' LoRA stacks (0: no linear carries adapters)

  // A kind-6 to 9 linear's group is its segment count: its segments and their types are the next ones of
  // gguf_segs / gguf_types, in linear order. lora: (A, B, meta) per linear, empty tensors for none. qk_norms: (q, k)
  // head-norm weights [D] per layer, empty for none; layer_meta: (rotary table or -1, window, KV group) per layer.
  // norms: per layer (input, post-attention) of the activation dtype, or for Gemma (input, post-attention,
  // pre-feedforward, post-feedforward) float32 1 + w, then the final norm.
  DecodeStack(std::vector<at::Tensor> norms_, std::vector<at::Tensor> lin_tensors, std::vector<int64_t> meta,
              std::vector<at::Tensor> gguf_segs, std::vector<int64_t> gguf_types, std::vector<at::Tensor> lora,
              std::vector<at::Tensor> qk_norms, std::vector<int64_t> layer_meta, std::vector<at::Tensor> kcs,
              std::vector<at::Tensor> vcs, std::vector<at::Tensor> tables, int64_t h, int64_t hkv, int64_t d,
              double eps_, double scale_, bool gemma_, at::ScalarType dtype)
      : norms(norms_), k_caches(kcs), v_caches(vcs), cos_sin(tables), H(h), Hkv(hkv), D(d), eps(eps_), scale(scale_),
        gemma(gemma_), x_dtype(dtype) {
    const size_t L = kcs.size();
    TORCH_CHECK(vcs.size() == L, "DecodeStack: a V cache per K cache");
    for (size_t i = 0; i < L; ++i) {
      const at::ScalarType c = kcs[i].scalar_type();
      TORCH_CHECK(vcs[i].scalar_type() == c && cache_readable(c, dtype),
                  "DecodeStack: caches of the activation dtype, or float16 / bfloat16 under float32 activations");
    }
    TORCH_CHECK(norms.size() == (gemma ? 4 : 2) * L + 1 && lin_tensors.size() == 16 * L && meta.size() == 16 * L,
                "DecodeStack: 2L+1 norms (Gemma: 4L+1), 4 linears x (4 tensors, 4 ints) per layer");
    if (gemma)
      for (const at::Tensor& n : norms)
        TORCH_CHECK(n.scalar_type() == at::kFloat && n.is_contiguous(), "DecodeStack: Gemma norms are float32 1 + w");
    TORCH_CHECK(lora.size() == 12 * L, "DecodeStack: LoRA (A, B, meta) per linear");
    TORCH_CHECK(!tables.empty(), "DecodeStack: at least one cos/sin table");
    for (const at::Tensor& cs : tables) {
      TORCH_CHECK(cs.scalar_type() == at::kFloat && cs.stride(1) == 1, "DecodeStack: float32 cos/sin cache");
      TORCH_CHECK(cs.size(1) % 2 == 0 && cs.size(1) <= d, "DecodeStack: cos/sin table of an even width <= head_dim");
    }
    TORCH_CHECK(gguf_segs.size() == gguf_types.size(), "DecodeStack: one ggml type per GGUF segment");
    set_extras(qk_norms, layer_meta, dtype, L);
    size_t seg = 0;
    for (size_t i = 0; i < 4 * L; ++i) {
      Lin l;
      l.kind = meta[4 * i]; l.n = meta[4 * i + 1]; l.k = meta[4 * i + 2]; l.group = meta[4 * i + 3];
      l.a = lin_tensors[4 * i]; l.b = lin_tensors[4 * i + 1]; l.c = lin_tensors[4 * i + 2];
      if (lin_tensors[4 * i + 3].numel()) l.bias = lin_tensors[4 * i + 3];
      if (l.kind >= 6 && l.kind <= 9) {
        TORCH_CHECK(l.group > 0 && seg + l.group <= gguf_segs.size(), "DecodeStack: too few GGUF segments");
        l.segs.assign(gguf_segs.begin() + seg, gguf_segs.begin() + seg + l.group);
        l.types.assign(gguf_types.begin() + seg, gguf_types.begin() + seg + l.group);
        kq_segments(l.segs, l.types, l.k);  // refuse a bad segment now, not in the first step
        seg += l.group;
      }
      if (lora[3 * i].numel()) set_lora(l, lora[3 * i], lora[3 * i + 1], lora[3 * i + 2], dtype);
      lins.push_back(l);
    }
    TORCH_CHECK(seg == gguf_segs.size(), "DecodeStack: GGUF segments left over");
  }

  void set_extras(const std::vector<at::Tensor>& qk_norms, const std::vector<int64_t>& layer_meta,
                  at::ScalarType dtype, size_t L) {
    TORCH_CHECK(qk_norms.size() == 2 * L && layer_meta.size() == 3 * L,
                "DecodeStack: (q, k) norms and (rope, window, KV group) per layer");
    for (size_t i = 0; i < L; ++i) {
      LayerExtras e;
      for (int j = 0; j < 2; ++j) {
        const at::Tensor& w = qk_norms[2 * i + j];
        if (!w.numel()) continue;
        TORCH_CHECK(w.dim() == 1 && w.size(0) == D && w.is_contiguous() &&
                        w.scalar_type() == (gemma ? at::kFloat : dtype),
                    "DecodeStack: q/k norm weights [head_dim], contiguous, of the activation dtype (Gemma: float32)");
        (j == 0 ? e.q_norm : e.k_norm) = w;
      }
      e.rope_table = layer_meta[3 * i];
      e.window = layer_meta[3 * i + 1];
      e.kv_group = layer_meta[3 * i + 2];
      TORCH_CHECK(e.rope_table >= -1 && e.rope_table < static_cast<int64_t>(cos_sin.size()),
                  "DecodeStack: a layer's rotary table is -1 (none) or one of the tables given");
      TORCH_CHECK(e.window >= 0, "DecodeStack: window >= 0 (0: full attention)");
      TORCH_CHECK(e.kv_group >= 0, "DecodeStack: KV group >= 0");
      extras.push_back(e);
    }
  }

  // Holds the stacks themselves (no copy): adapters loaded into their slots later are seen by the next step.
  void set_lora(Lin& l, const at::Tensor& a, const at::Tensor& b, const at::Tensor& meta, at::ScalarType dtype) {
    TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(1) == b.size(2) &&
                    a.size(2) == l.k && b.size(1) == l.n, "DecodeStack: LoRA stacks A [S, R, K], B [S, N, R]");
    TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && a.scalar_type() == dtype && b.scalar_type() == dtype,
                "DecodeStack: contiguous LoRA stacks of the activation dtype");
    TORCH_CHECK(num_lora_slots == 0 || num_lora_slots == a.size(0), "DecodeStack: one slot count for all LoRA stacks");
    num_lora_slots = a.size(0);
    lora_meta_of(meta, a.size(0), l.n);
    l.lora_a = a;
    l.lora_b = b;
    l.lora_meta = meta;
  }

  // Layer i's attention sublayer on its normed input h [B, hidden]: q/k/v, the head norms, rotary, the K/V written,
  // paged attention and the output projection.
  template <typename T>
  at::Tensor attend(const at::Tensor& h, size_t i, const at::Tensor& pos, const at::Tensor& slots, const at::Tensor& bt,
                    const at::Tensor& sl, const LoraRows& lora) {
    const int64_t B = h.size(0), qs = H * D, kvs = Hkv * D;
    const Lin* l = &lins[4 * i];
    at::Tensor qkv = apply_linear<T>(h, l[0], lora);
    at::Tensor q = qkv.narrow(1, 0, qs).view({B, H, D});
    at::Tensor k = qkv.narrow(1, qs, kvs).view({B, Hkv, D});
    at::Tensor v = qkv.narrow(1, qs + kvs, kvs).view({B, Hkv, D});
    const LayerExtras& e = extras[i];
    if (e.q_norm.defined()) q = head_norm<T>(q, e.q_norm, eps, gemma);
    if (e.k_norm.defined()) k = head_norm<T>(k, e.k_norm, eps, gemma);
    if (e.rope_table >= 0) {
      const at::Tensor& cs = cos_sin[e.rope_table];
      rot<T>(q, pos.data_ptr<int64_t>(), cs.data_ptr<float>(), cs.stride(0), cs.size(1) / 2);
      rot<T>(k, pos.data_ptr<int64_t>(), cs.data_ptr<float>(), cs.stride(0), cs.size(1) / 2);
    }
    const int64_t* layer_slots = slots.select(0, e.kv_group).data_ptr<int64_t>();
    at::Tensor &kc = k_caches[i], &vc = v_caches[i];
    with_cache_type<T>(kc.scalar_type(), [&](auto c) { write_kv<T, decltype(c)>(k, v, kc, vc, layer_slots); });
    at::Tensor attn = at::empty({B, H, D}, h.options());
    decode_any_cache<T>(q, kc, vc, bt.select(0, e.kv_group), sl, scale, attn, e.window);
    return apply_linear<T>(attn.view({B, qs}), l[1], lora);
  }

  // Gemma 3: x += norm(attention(norm(x))); x += norm(mlp(norm(x))), the norms' weights float32 1 + w.
  template <typename T>
  at::Tensor step_gemma(at::Tensor x, const at::Tensor& pos, const at::Tensor& slots, const at::Tensor& bt,
                        const at::Tensor& sl, const LoraRows& lora) {
    at::Tensor none;
    for (size_t i = 0; i < k_caches.size(); ++i) {
      const Lin* l = &lins[4 * i];
      at::Tensor h = at::empty(x.sizes(), x.options()), nx = at::empty(x.sizes(), x.options());
      gemma_rms<T>(x, norms[4 * i], eps, none, h);
      gemma_rms<T>(attend<T>(h, i, pos, slots, bt, sl, lora), norms[4 * i + 1], eps, x, nx);
      x = nx;
      h = at::empty(x.sizes(), x.options());
      gemma_rms<T>(x, norms[4 * i + 2], eps, none, h);
      at::Tensor gu = apply_linear<T>(h, l[2], lora);
      nx = at::empty(x.sizes(), x.options());
      gemma_rms<T>(apply_linear<T>(gelu_tanh_mul<T>(gu, gu.size(1) / 2), l[3], lora), norms[4 * i + 3], eps, x, nx);
      x = nx;
    }
    at::Tensor out = at::empty(x.sizes(), x.options());
    gemma_rms<T>(x, norms.back(), eps, none, out);
    return out;
  }

  template <typename T>
  at::Tensor step(at::Tensor x, const at::Tensor& pos, const at::Tensor& slots, const at::Tensor& bt,
                  const at::Tensor& sl, const LoraRows& lora) {
    if (gemma) return step_gemma<T>(x, pos, slots, bt, sl, lora);
    at::Tensor residual, h, out;
    for (size_t i = 0; i < k_caches.size(); ++i) {
      const Lin* l = &lins[4 * i];
      if (i == 0) {
        residual = x;
        h = at::empty(x.sizes(), x.options());
        at::Tensor none;
        rms<T>(x, norms[0], none, eps, h, none);
      } else {
        auto nr = at::empty(x.sizes(), x.options());
        h = at::empty(x.sizes(), x.options());
        rms<T>(x, norms[2 * i], residual, eps, h, nr);
        residual = nr;
      }
      at::Tensor o = attend<T>(h, i, pos, slots, bt, sl, lora);
      auto nr = at::empty(x.sizes(), x.options());
      h = at::empty(x.sizes(), x.options());
      rms<T>(o, norms[2 * i + 1], residual, eps, h, nr);
      residual = nr;
      at::Tensor gu = apply_linear<T>(h, l[2], lora);
      x = apply_linear<T>(silu_mul<T>(gu, gu.size(1) / 2), l[3], lora);
    }
    out = at::empty(x.sizes(), x.options());
    auto nr = at::empty(x.sizes(), x.options());
    rms<T>(x, norms.back(), residual, eps, out, nr);
    return out;
  }

  // lora_slots: the adapter slot of each row (-1: the base model), or an empty tensor in a base-only step. slots [T]
  // and bt [B, max_blocks], or per KV group [G, T] and [G, B, max_blocks].
  at::Tensor run(at::Tensor x, at::Tensor pos, at::Tensor slots, at::Tensor bt, at::Tensor sl, at::Tensor lora_slots) {
    if (slots.dim() == 1) slots = slots.unsqueeze(0);
    if (bt.dim() == 2) bt = bt.unsqueeze(0);
    TORCH_CHECK(slots.dim() == 2 && bt.dim() == 3 && slots.size(0) == bt.size(0),
                "DecodeStack: slots/tables per group");
    for (const LayerExtras& e : extras)
      TORCH_CHECK(e.kv_group < bt.size(0), "DecodeStack: a layer's KV group has no tables in this step");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "DecodeStack: x [B, hidden] contiguous");
    TORCH_CHECK(pos.scalar_type() == at::kLong && slots.scalar_type() == at::kLong, "DecodeStack: int64 positions/slots");
    TORCH_CHECK(bt.scalar_type() == at::kInt && sl.scalar_type() == at::kInt, "DecodeStack: int32 tables/lengths");
    TORCH_CHECK(x.scalar_type() == x_dtype, "DecodeStack: x of the activation dtype the stack was built for");
    TORCH_CHECK(!lora_slots.numel() || lora_slots.numel() == x.size(0), "DecodeStack: one LoRA slot (or -1) per row");
    pos = pos.contiguous(); slots = slots.contiguous(); bt = bt.contiguous(); sl = sl.contiguous();
    const LoraRows lora = lora_slots.numel() ? lora_rows_of(lora_slots, num_lora_slots) : LoraRows();
    switch (x.scalar_type()) {
      case at::kBFloat16: return step<at::BFloat16>(x, pos, slots, bt, sl, lora);
      case at::kHalf: return step<at::Half>(x, pos, slots, bt, sl, lora);
      case at::kFloat: return step<float>(x, pos, slots, bt, sl, lora);
      default: TORCH_CHECK(false, "DecodeStack: unsupported dtype");
    }
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                          std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, int64_t, int64_t, double,
                          double, bool, at::ScalarType>())
      .def("run", &DecodeStack::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
