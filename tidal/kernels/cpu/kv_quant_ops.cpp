// The group-wise int8 / int4 KV cache's (kv/quant_cache.py) two bulk ops, in C++ because torch's
// version costs ~20 small ops a layer each step:
//  kv_quant_write: quantize new K and V rows and store them at their cache slots, with weights/quant.py's
//    arithmetic (min rounded down and scale up into fp16, codes round((x - min) / scale) clamped, int4
//    nibble order e | e + GS/2), so the cache holds what `quantize_rows` would have written;
//  kv_dequant_blocks: cache blocks -> a dense [n, block_size, kv_heads, head_dim] bf16 / fp32 tensor
//    (x = scale * q + min in fp32), which the bf16 prefill kernel then reads as a small paged cache.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include "fused_ops.h"

namespace {

// x in fp16, rounded toward -inf (down) or +inf instead of to nearest (weights/quant.py's _round_toward)
inline at::Half half_toward(float x, bool down) {
  at::Half y(x);
  const float yf = static_cast<float>(y);
  if (down ? yf <= x : yf >= x) return y;
  uint16_t b = y.x;
  const bool neg = b & 0x8000, zero = (b & 0x7FFF) == 0;
  if (down) b = zero ? 0x8001 : (neg ? b + 1 : b - 1);
  else b = zero ? 0x0001 : (neg ? b - 1 : b + 1);
  return at::Half(b, at::Half::from_bits());
}

void check_cache(const torch::Tensor& d, const torch::Tensor& s, const torch::Tensor& m) {
  TORCH_CHECK(d.is_contiguous() && s.is_contiguous() && m.is_contiguous() && d.scalar_type() == at::kByte &&
              s.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf,
              "a quantized KV cache is contiguous uint8 codes with fp16 scales and mins");
}

}  // namespace

void kv_quant_write(torch::Tensor k, torch::Tensor v, std::vector<torch::Tensor> kc, std::vector<torch::Tensor> vc,
                    torch::Tensor slots, int64_t bits, int64_t GS) {
  TORCH_CHECK(kc.size() == 3 && vc.size() == 3, "a quantized cache is (data, scale, min)");
  check_cache(kc[0], kc[1], kc[2]);
  check_cache(vc[0], vc[1], vc[2]);
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  auto kf = k.to(at::kFloat).contiguous(), vf = v.to(at::kFloat).contiguous();
  auto sl = slots.to(at::kLong).contiguous();
  const int64_t T = kf.size(0), H = kf.size(1), D = kf.size(2), NG = D / GS, DQ = D * bits / 8;
  TORCH_CHECK(D % GS == 0 && GS % 2 == 0 && kc[0].size(2) == H && kc[0].size(3) == DQ && kc[1].size(3) == NG,
              "K/V rows do not match the cache's head size and group size");
  const int qmax = (1 << bits) - 1;
  const int64_t* sp = sl.data_ptr<int64_t>();
  const float *kx = kf.data_ptr<float>(), *vx = vf.data_ptr<float>();
  uint8_t* codes_of[2] = {kc[0].data_ptr<uint8_t>(), vc[0].data_ptr<uint8_t>()};
  at::Half* scale_of[2] = {kc[1].data_ptr<at::Half>(), vc[1].data_ptr<at::Half>()};
  at::Half* min_of[2] = {kc[2].data_ptr<at::Half>(), vc[2].data_ptr<at::Half>()};
  at::parallel_for(0, 2 * T * H, 64, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> q(GS);
    for (int64_t i = begin; i < end; ++i) {
      const bool is_v = i >= T * H;
      const int64_t r = is_v ? i - T * H : i, t = r / H, h = r % H;
      const float* x = (is_v ? vx : kx) + r * D;
      const int64_t row = sp[t] * H + h;
      uint8_t* codes = codes_of[is_v] + row * DQ;
      at::Half *scale = scale_of[is_v] + row * NG, *mn = min_of[is_v] + row * NG;
      for (int64_t j = 0; j < NG; ++j) {
        const float* g = x + j * GS;
        float lo = g[0], hi = g[0];
        for (int64_t e = 1; e < GS; ++e) lo = std::min(lo, g[e]), hi = std::max(hi, g[e]);
        const at::Half m16 = half_toward(lo, true);
        const float m = static_cast<float>(m16);
        const at::Half s16 = half_toward((hi - m) / qmax, false);
        const float s = static_cast<float>(s16), inv = s > 0.f ? 1.f / s : 0.f;
        for (int64_t e = 0; e < GS; ++e)
          q[e] = static_cast<uint8_t>(std::min<float>(std::max<float>(std::nearbyint((g[e] - m) * inv), 0.f), qmax));
        scale[j] = s16, mn[j] = m16;
        if (bits == 8) {
          std::copy(q.begin(), q.end(), codes + j * GS);
        } else {
          for (int64_t e = 0; e < GS / 2; ++e) codes[j * GS / 2 + e] = q[e] | (q[e + GS / 2] << 4);
        }
      }
    }
  });
}

torch::Tensor kv_dequant_blocks(torch::Tensor data, torch::Tensor scale, torch::Tensor mn, torch::Tensor block_ids,
                                int64_t bits, int64_t GS, bool bf16) {
  check_cache(data, scale, mn);
  auto ids = block_ids.to(at::kLong).contiguous();
  const int64_t n = ids.size(0), BS = data.size(1), H = data.size(2), DQ = data.size(3), D = DQ * 8 / bits, NG = D / GS;
  auto out = torch::empty({n, BS, H, D}, data.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const int64_t* ip = ids.data_ptr<int64_t>();
  const uint8_t* cp = data.data_ptr<uint8_t>();
  const at::Half *spt = scale.data_ptr<at::Half>(), *mpt = mn.data_ptr<at::Half>();
  at::BFloat16* ob = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  at::parallel_for(0, n * BS * H, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = ip[i / (BS * H)] * BS * H + i % (BS * H);
      const uint8_t* q = cp + row * DQ;
      for (int64_t j = 0; j < NG; ++j) {
        const float s = static_cast<float>(spt[row * NG + j]), m = static_cast<float>(mpt[row * NG + j]);
        for (int64_t e = 0; e < GS; ++e) {
          const int code = bits == 8 ? q[j * GS + e]
                                     : (e < GS / 2 ? q[j * GS / 2 + e] & 15 : q[j * GS / 2 + e - GS / 2] >> 4);
          const float x = s * code + m;
          if (ob) ob[i * D + j * GS + e] = x;
          else of[i * D + j * GS + e] = x;
        }
      }
    }
  });
  return out;
}
