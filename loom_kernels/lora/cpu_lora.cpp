// The segmented LoRA product as one extension (loom_kernels/lora/cpu_lora.py); the loops are in cpu_lora.h.
#include "lora/cpu_lora.h"

// lora_add_ref's contract: rows [M] int64 grouped by segment, seg_starts [G+1] and seg_slots [G] int32; `meta`:
// the slots' LoraMeta rows, where the caller keeps them.
static void lora_add(at::Tensor y, at::Tensor x, at::Tensor a, at::Tensor b, at::Tensor rows, at::Tensor seg_starts,
                     at::Tensor seg_slots, c10::optional<at::Tensor> meta) {
  lora_check(y, x, a, b);
  const LoraMeta m = meta.has_value() ? lora_meta_of(meta.value(), a.size(0), b.size(1)) : LoraMeta();
  const at::Tensor r = rows.to(at::kLong).contiguous(), st = seg_starts.to(at::kLong).contiguous();
  const at::Tensor sl = seg_slots.to(at::kLong).contiguous();
  const int64_t G = sl.numel(), T_ = x.size(0), S = a.size(0);
  TORCH_CHECK(st.numel() == G + 1 || (G == 0 && st.numel() <= 1), "lora: G segments need G + 1 seg_starts");
  LoraRows g;
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t* sp = st.data_ptr<int64_t>();
  for (int64_t grp = 0; grp < G; ++grp) {
    TORCH_CHECK(sp[grp] <= sp[grp + 1] && sp[grp + 1] <= r.numel(), "lora: bad segment bounds");
    const int64_t slot = sl.data_ptr<int64_t>()[grp];
    TORCH_CHECK(slot >= 0 && slot < S, "lora: slot ", slot, " out of range (", S, " slots)");
    for (int64_t j = sp[grp]; j < sp[grp + 1]; ++j) {
      TORCH_CHECK(rp[j] >= 0 && rp[j] < T_, "lora: row ", rp[j], " out of range");
      g.rows.push_back(rp[j]);
    }
    g.starts.push_back(static_cast<int64_t>(g.rows.size()));
    g.slots.push_back(slot);
  }
  lora_dispatch(y, x, a, b, g, m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_add", torch::wrap_pybind_function(lora_add), "lora_add");
}
