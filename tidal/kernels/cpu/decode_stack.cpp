// A Llama-family decoder stack's decode step (every row one sequence's one new token) as one C++ call:
// per layer RMSNorm, fused QKV (int4 GEMV, or --quant int8's per-row GEMV; optional bias), rotary, K/V into
// the paged cache, paged decode attention, O projection, RMSNorm, gate-up, SiLU-and-mul, down; the final
// norm after the last layer. Weights: (qdata uint8, scale, min) for int4, (qint8 int8, fp32 scale, fp32
// zero) for int8 (quant_ops' int8pack tuple). It runs the same kernel code the Python layers call for
// these shapes (rms_norm.cpp, int4_linear.cpp, w8a8_linear.cpp,
// fused_ops.cpp, paged_decode.cpp), in the same order, so its output equals the layer-by-layer path
// bit for bit; what it removes is ~40 Python-level calls and ~5 OpenMP fork/joins per layer: the whole
// step is one parallel region. model/fused_decode.py builds it.
#include <torch/extension.h>
#include <algorithm>
#include <exception>
#include <vector>
#include <omp.h>
#include "fused_ops.h"
#include "int4_linear.h"

namespace {
struct Int4W {  // or int8 per row (q int8): m is then the per-row zero
  torch::Tensor q, s, m;
  bool int8() const { return q.scalar_type() == at::kChar; }
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
      TORCH_CHECK(t.size() == 3, "a weight is (qdata, scale, min) for int4 or (qint8, scale, zero) for int8");
      const Int4W w{t[0], t[1], t[2]};
      // checked here: the step's parallel region must not throw
      TORCH_CHECK(!w.int8() || (w.q.dim() == 2 && w.q.is_contiguous() && w.s.scalar_type() == at::kFloat &&
                                w.m.scalar_type() == at::kFloat && w.s.is_contiguous() && w.m.is_contiguous() &&
                                w.s.numel() == w.q.size(0) && w.m.numel() == w.q.size(0)),
                  "an int8 weight is (contiguous int8 [out, in], fp32 scale [out], fp32 zero [out])");
      return w;
    };
    layers_.push_back(Layer{ln1, ln2, w(qkv), w(o), w(gate_up), w(down), qkv_bias});
  }

  // x: the embedded tokens [rows, hidden] -> the final-normed hidden states [rows, hidden]
  torch::Tensor forward(torch::Tensor x, torch::Tensor positions, const std::vector<torch::Tensor>& k_caches,
                        const std::vector<torch::Tensor>& v_caches, torch::Tensor slot_mapping,
                        torch::Tensor block_tables, torch::Tensor seq_lens) {
    TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "one K and V cache per layer");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                "DecodeStack: x must be contiguous fp32 or bf16 [rows, hidden]");
#ifdef TIDAL_VNNI
    const int64_t rows = x.size(0), q_size = H_ * D_, kv_size = KVH_ * D_;
    auto tables = block_tables.to(torch::kInt64).contiguous();
    auto lens = seq_lens.to(torch::kInt64).contiguous();
    auto opts = x.options();
    auto qkv = torch::empty({rows, layers_[0].qkv.q.size(0)}, opts);
    auto attn = torch::empty({rows, H_, D_}, opts);
    auto o = torch::empty({rows, layers_[0].o.q.size(0)}, opts);
    auto gu = torch::empty({rows, layers_[0].gate_up.q.size(0)}, opts);
    auto y = torch::empty({rows, layers_[0].down.q.size(0)}, opts);
    const bool split_attention = paged_decode_range_supported(attn, k_caches[0], v_caches[0]);
    std::exception_ptr error;   // a throw inside the region must not cross it: kept, rethrown after
    auto guarded = [&error](auto&& f) {
      try {
        f();
      } catch (...) {
        if (!error) error = std::current_exception();
      }
    };
    torch::Tensor residual = x, q3;
    Int4Acts acts;
    RowActs acts8;
    const int64_t units = rows * KVH_;
    // One parallel region for the whole step (a fork/join costs several us; a step had ~150 of them):
    // the matmuls and the attention are split by rows / (sequence, KV head) per thread, the small ops
    // run on one thread between barriers. Each output element is computed by the same code as in the
    // per-op kernels, so the result does not depend on the split.
#pragma omp parallel num_threads(at::get_num_threads())
    {
      const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
      auto lo = [&](int64_t n) { return n * tid / nt; };
      auto hi = [&](int64_t n) { return n * (tid + 1) / nt; };
      auto gemv = [&](const Int4W& w, torch::Tensor& out) {
        const int64_t n = w.q.size(0);
        if (w.int8()) {  // whole 4-row tiles per thread, as int8_rows_gemv splits them
          const int64_t tiles = (n + 3) / 4;
          int8_rows_gemv_range(acts8, w.q, w.s, w.m, out, 4 * lo(tiles), std::min(n, 4 * hi(tiles)));
        } else {
          int4_gemv_range(acts, w.q, w.s, w.m, out, lo(n), hi(n));
        }
      };
      // the activations of the next matmul, in the form its weight's kernel reads
      auto prepare = [&](const torch::Tensor& t, const Int4W& w) {
        if (w.int8()) rows_prepare(t, acts8);
        else int4_quantize_acts(t, acts);
      };
      for (size_t i = 0; i < layers_.size(); ++i) {
        const Layer& L = layers_[i];
#pragma omp single
        guarded([&] {
          prepare(i == 0 ? add_rms_norm(x, c10::nullopt, L.ln1, eps_) : add_rms_norm(y, residual, L.ln1, eps_), L.qkv);
        });
        gemv(L.qkv, qkv);
#pragma omp barrier
#pragma omp single
        guarded([&] {
          torch::Tensor t = L.qkv_bias.has_value() ? qkv + L.qkv_bias->to(qkv.scalar_type()) : qkv;
          auto q = t.narrow(1, 0, q_size).view({rows, H_, D_});
          auto k = t.narrow(1, q_size, kv_size).view({rows, KVH_, D_});
          auto v = t.narrow(1, q_size + kv_size, kv_size).view({rows, KVH_, D_});
          rotary_(q, k, cos_, sin_, positions);
          const auto& kc = k_caches[i];
          const auto& vc = v_caches[i];
          kc.view({-1, KVH_, D_}).index_copy_(0, slot_mapping, k.to(kc.scalar_type()));
          vc.view({-1, KVH_, D_}).index_copy_(0, slot_mapping, v.to(vc.scalar_type()));
          if (split_attention) q3 = q.contiguous();
          else attn = paged_decode_attention(q, kc, vc, block_tables, seq_lens, scale_);
        });
        if (split_attention) {
          paged_decode_attention_range(q3, k_caches[i], v_caches[i], tables, lens, attn, scale_, lo(units), hi(units));
#pragma omp barrier
        }
#pragma omp single
        guarded([&] { prepare(attn.view({rows, q_size}), L.o); });
        gemv(L.o, o);
#pragma omp barrier
#pragma omp single
        guarded([&] { prepare(add_rms_norm(o, residual, L.ln2, eps_), L.gate_up); });
        gemv(L.gate_up, gu);
#pragma omp barrier
#pragma omp single
        guarded([&] { prepare(silu_and_mul(gu), L.down); });
        gemv(L.down, y);
#pragma omp barrier
      }
    }
    if (error) std::rethrow_exception(error);
    return add_rms_norm(y, residual, norm_, eps_);
#else
    TORCH_CHECK(false, "DecodeStack needs AVX-512 VNNI (int4_gemv_supported())");
#endif
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
