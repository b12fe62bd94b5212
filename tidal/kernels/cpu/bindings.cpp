// The Python bindings of every CPU op (declared in fused_ops.h), one module for the whole extension.
#include <torch/extension.h>
#include "fused_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
  m.def("add_rms_norm", &add_rms_norm, "out = rmsnorm(x + residual) * w, residual <- x + residual in place (rms_norm.cpp)");
  m.def("prefill_attention_bf16", &prefill_attention_bf16,
        "one sequence's causal prefill over a bf16 paged cache, or None where unsupported (prefill_bf16.cpp)");
  m.def("silu_and_mul", &silu_and_mul, "[rows, 2I] -> silu(gate) * up");
  m.def("rotary_", &rotary_, "rotate q and k in place (NeoX layout) at positions");
  m.def("int4_gemv_supported", &int4_gemv_supported, "whether int4_gemv has its AVX-512 VNNI path here");
  m.def("int4_gemv", &int4_gemv, "x [rows, in] @ int4 weight.T, weights read packed (int4_linear.cpp)");
  m.def("int4_dequant", &int4_dequant, "int4 weight -> float weight into out (int4_linear.cpp)");
  m.def("int8_gemv", &int8_gemv, "x [rows, in] @ int8 (group 32) weight.T, weights read as stored (int4_linear.cpp)");
  m.def("int8_dequant", &int8_dequant, "int8 (group 32) weight -> float weight into out (int4_linear.cpp)");
  m.def("w8a8_linear", &w8a8_linear,
        "x [rows, in] @ int8 weight.T with x rounded to int8 per row, oneDNN's int8 GEMM (w8a8_linear.cpp)");
  m.def("w8a8_vnni_supported", &w8a8_vnni_supported, "whether w8a8_vnni has its AVX-512 VNNI path here");
  m.def("w8a8_vnni_pack", &w8a8_vnni_pack, "int8 [out, in] -> (VNNI panels, 128 * row sums) for w8a8_vnni (w8a8_linear.cpp)");
  m.def("w8a8_vnni", &w8a8_vnni, "w8a8_linear on a w8a8_vnni_pack'ed weight: tidal's own VNNI GEMM (w8a8_linear.cpp)");
  m.def("int8_rows_dequant", &int8_rows_dequant, "per-row int8 weight -> float into out (w8a8_linear.cpp)");
  m.def("int8_rows_gemv", &int8_rows_gemv, "x @ per-row int8 weight^T for a few rows, fp32 math (rows_gemv.cpp)");
  m.def("bf16_gemv", &bf16_gemv, "x @ bf16 weight^T for a few rows, fp32 math (rows_gemv.cpp)");
  m.def("kv_quant_write", &kv_quant_write, "quantize K/V rows into an int8/int4 paged cache at slots (kv_quant_ops.cpp)");
  m.def("kv_dequant_blocks", &kv_dequant_blocks, "int8/int4 cache blocks -> dense bf16 or fp32 (kv_quant_ops.cpp)");
  bind_decode_stack(m);
}
