// Fused elementwise CPU ops (fused_ops.cpp), bound to Python in paged_decode.cpp's module.
#pragma once
#include <torch/extension.h>

torch::Tensor silu_and_mul(torch::Tensor gu);
void rotary_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions);
