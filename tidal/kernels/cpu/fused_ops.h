// The CPU ops of this extension, one declaration per op, bound to Python in bindings.cpp.
#pragma once
#include <torch/extension.h>
#include <vector>

torch::Tensor add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor w, double eps);
torch::Tensor silu_and_mul(torch::Tensor gu);
void rotary_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions);
torch::Tensor prefill_attention_bf16(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, int64_t seq_len, double scale);
// int4_linear.cpp: group-wise int4 weights (weights/quant.py's layout) straight from their packed bytes
bool int4_gemv_supported();
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor s, torch::Tensor m);
torch::Tensor int4_dequant(torch::Tensor q, torch::Tensor s, torch::Tensor m, torch::Tensor out);
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor s, torch::Tensor m);
torch::Tensor int8_dequant(torch::Tensor q, torch::Tensor s, torch::Tensor m, torch::Tensor out);
// w8a8_linear.cpp: int8 weights x int8 activations rounded per row, oneDNN's int8 GEMM
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor ws, c10::optional<torch::Tensor> wz,
                          c10::optional<torch::Tensor> smooth);
// the same on a weight packed once for tidal's AVX-512 VNNI GEMM (w8a8_linear.cpp says the layout)
bool w8a8_vnni_supported();
std::vector<torch::Tensor> w8a8_vnni_pack(torch::Tensor wq);
torch::Tensor w8a8_vnni(torch::Tensor x, torch::Tensor packed, torch::Tensor comp, torch::Tensor ws,
                        c10::optional<torch::Tensor> wz, c10::optional<torch::Tensor> smooth);
// --quant int8's per-row weight as floats (w8a8_linear.cpp)
void int8_rows_dequant(torch::Tensor q, torch::Tensor scale, torch::Tensor zero, torch::Tensor out);
// rows_gemv.cpp: a few rows times a per-row int8 or a bf16 weight, fp32 math
torch::Tensor int8_rows_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor zero);
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w);
// int8_rows_gemv in pieces, for decode_stack.cpp's one parallel region: the activations as floats with
// their row sums (rows_prepare, also bf16_gemv's), then weight rows [n0, n1) (n0 a multiple of 4) into
// y [M, N]; s and z fp32, no checks or threads
struct RowActs {
  std::vector<float> x, sum;
  int64_t M = 0, K = 0;
};
void rows_prepare(const torch::Tensor& x, RowActs& a);
void int8_rows_gemv_range(const RowActs& a, const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& z,
                          torch::Tensor& y, int64_t n0, int64_t n1);
// kv_quant_ops.cpp: the group-wise int8 / int4 KV cache (kv/quant_cache.py)
void kv_quant_write(torch::Tensor k, torch::Tensor v, std::vector<torch::Tensor> kc, std::vector<torch::Tensor> vc,
                    torch::Tensor slots, int64_t bits, int64_t group_size);
torch::Tensor kv_dequant_blocks(torch::Tensor data, torch::Tensor scale, torch::Tensor mn, torch::Tensor block_ids,
                                int64_t bits, int64_t group_size, bool bf16);
// paged_decode.cpp
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale);
bool paged_decode_range_supported(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache);
void paged_decode_attention_range(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                  const torch::Tensor& tables, const torch::Tensor& lens, torch::Tensor& out,
                                  double scale, int64_t begin, int64_t end);
// decode_stack.cpp: a decoder stack's decode step in one call
void bind_decode_stack(pybind11::module& m);
