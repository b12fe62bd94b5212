// int4_linear.cpp (int4 and int8 group-32 GEMV) pieces for callers that run their own parallel region (decode_stack.cpp): the
// activations quantized once per matmul input, then any range of weight rows per thread.
#pragma once
#include <torch/extension.h>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define TIDAL_VNNI 1
#endif

// activation rows quantized per group of 32 (int4_linear.cpp says the layout)
struct Int4Acts {
  std::vector<int8_t> q;    // [M, K]
  std::vector<float> d;     // [M, K/32]: the int8 step
  std::vector<float> sum;   // [M, K/32]: the fp32 sum of the group, for the min term
  int64_t M = 0, K = 0;
};

// x [M, K], contiguous fp32 or bf16 (checked by the caller)
void int4_quantize_acts(const torch::Tensor& x, Int4Acts& a);
// y[:, n0:n1] = acts @ W[n0:n1].T, y [M, N] contiguous in fp32 or bf16; no checks, no threads
void int4_gemv_range(const Int4Acts& a, const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& m,
                     torch::Tensor& y, int64_t n0, int64_t n1);
