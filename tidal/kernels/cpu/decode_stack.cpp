// A Llama-family decoder stack's decode step (every row one sequence's one new token) as one C++ call:
// per layer RMSNorm, fused QKV (int4 GEMV, optional bias), rotary, K/V into the paged cache, paged decode
// attention, O projection, RMSNorm, gate-up, SiLU-and-mul, down; the final norm after the last layer.
// It calls the same kernels the Python layers call for these shapes (rms_norm.cpp, int4_linear.cpp,
// fused_ops.cpp, paged_decode.cpp), in the same order, so its output equals the layer-by-layer path
// bit for bit; what it removes is ~40 Python-level calls per layer. model/fused_decode.py builds it.
#include <torch/extension.h>
#include <vector>
#include "fused_ops.h"

namespace {
struct Int4W {
  torch::Tensor q, s, m;
  torch::Tensor gemv(const torch::Tensor& x) const { return int4_gemv(x, q, s, m); }
};

struct Layer {
  torch::Tensor ln1, ln2;
  Int4W qkv, o, gate_up, down;
  c10::optional<torch::Tensor> qkv_bias;
};
}  // namespace

class DecodeStack {
 public:
  DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale, torch::Tensor cos,
              torch::Tensor sin, torch::Tensor final_norm)
      : H_(heads), KVH_(kv_heads), D_(head_dim), eps_(eps), scale_(scale), cos_(cos), sin_(sin), norm_(final_norm) {}

  void add_layer(torch::Tensor ln1, torch::Tensor ln2, std::vector<torch::Tensor> qkv, c10::optional<torch::Tensor> qkv_bias,
                 std::vector<torch::Tensor> o, std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down) {
    auto w = [](const std::vector<torch::Tensor>& t) {
      TORCH_CHECK(t.size() == 3, "an int4 weight is (qdata, scale, min)");
      return Int4W{t[0], t[1], t[2]};
    };
    layers_.push_back(Layer{ln1, ln2, w(qkv), w(o), w(gate_up), w(down), qkv_bias});
  }

  // x: the embedded tokens [rows, hidden] -> the final-normed hidden states [rows, hidden]
  torch::Tensor forward(torch::Tensor x, torch::Tensor positions, const std::vector<torch::Tensor>& k_caches,
                        const std::vector<torch::Tensor>& v_caches, torch::Tensor slot_mapping,
                        torch::Tensor block_tables, torch::Tensor seq_lens) {
    TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "one K and V cache per layer");
    const int64_t rows = x.size(0), q_size = H_ * D_, kv_size = KVH_ * D_;
    torch::Tensor residual = x;
    torch::Tensor h = add_rms_norm(x, c10::nullopt, layers_[0].ln1, eps_);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      if (i > 0) h = add_rms_norm(x, residual, L.ln1, eps_);
      torch::Tensor qkv = L.qkv.gemv(h);
      if (L.qkv_bias.has_value()) qkv = qkv + L.qkv_bias->to(qkv.scalar_type());
      auto q = qkv.narrow(1, 0, q_size).view({rows, H_, D_});
      auto k = qkv.narrow(1, q_size, kv_size).view({rows, KVH_, D_});
      auto v = qkv.narrow(1, q_size + kv_size, kv_size).view({rows, KVH_, D_});
      rotary_(q, k, cos_, sin_, positions);
      const auto& kc = k_caches[i];
      const auto& vc = v_caches[i];
      kc.view({-1, KVH_, D_}).index_copy_(0, slot_mapping, k.to(kc.scalar_type()));
      vc.view({-1, KVH_, D_}).index_copy_(0, slot_mapping, v.to(vc.scalar_type()));
      auto attn = paged_decode_attention(q, kc, vc, block_tables, seq_lens, scale_);
      auto o = L.o.gemv(attn.reshape({rows, q_size}));
      h = add_rms_norm(o, residual, L.ln2, eps_);
      x = L.down.gemv(silu_and_mul(L.gate_up.gemv(h)));
    }
    return add_rms_norm(x, residual, norm_, eps_);
  }

 private:
  int64_t H_, KVH_, D_;
  double eps_, scale_;
  torch::Tensor cos_, sin_, norm_;
  std::vector<Layer> layers_;
};

void bind_decode_stack(pybind11::module& m) {
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, double, torch::Tensor, torch::Tensor, torch::Tensor>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("forward", &DecodeStack::forward);
}
