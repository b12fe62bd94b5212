// W8A8 linear for batches (--quant w8a8): int8 weights with one scale per output row, activations
// rounded to int8 per row at run time (dynamic, symmetric), the int8 x int8 -> int32 GEMM done by
// oneDNN through at::_int_mm (AVX-512 VNNI: twice bf16's multiply rate on a CPU without AMX), and
// the rescale fused here, tile by tile:
//   y[m, n] = acc[m, n] * a[m] * ws[n]  (+ rowsum(x)[m] * wz[n] where the weights have a zero point)
// with a[m] = max|x[m, :]| / 127. With `smooth` (SmoothQuant, model/smooth.py), x is first multiplied
// by smooth[k] per input channel (the weight's columns were divided by it before rounding).
// The GEMM runs in tiles of rows and columns so each tile's int32
// result is rescaled while it is still in cache. tests/test_w8a8.py compares it with the same arithmetic in torch.
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include "avx512_common.h"
#include "fused_ops.h"

namespace {

constexpr int64_t CHUNK_ROWS = 128;
constexpr int64_t TILE_INTS = 1 << 18;   // 1 MiB of int32 results per tile

template <typename T>
inline float load_f32(const T* p) { return static_cast<float>(*p); }

// one row: xq = round(x / a), a = max|x| / 127 (1 for an all-zero row), sum = sum(x), where x is
// the row times `smooth` per channel when given
template <typename T>
void quantize_row(const T* x, const float* smooth, int64_t K, int8_t* q, float* a, float* sum, float* buf) {
  float amax = 0.f, s = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float v = smooth ? load_f32(x + k) * smooth[k] : load_f32(x + k);
    buf[k] = v;
    amax = std::max(amax, std::fabs(v));
    s += v;
  }
  const float step = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / step;
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(buf[k] * inv));
  *a = step;
  *sum = s;
}

template <typename T>
void rescale_row(const int32_t* acc, int64_t N, float a, float rowsum, const float* ws, const float* wz, T* y) {
  int64_t n = 0;
#ifdef TIDAL_AVX512_BF16
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m512 va = _mm512_set1_ps(a), vs = _mm512_set1_ps(rowsum);
    for (; n + 16 <= N; n += 16) {
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(acc + n)), va),
                               _mm512_loadu_ps(ws + n));
      if (wz) v = _mm512_fmadd_ps(vs, _mm512_loadu_ps(wz + n), v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + n), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
#endif
  for (; n < N; ++n) {
    float v = static_cast<float>(acc[n]) * a * ws[n];
    if (wz) v += rowsum * wz[n];
    y[n] = static_cast<T>(v);
  }
}

template <typename T>
void run(const torch::Tensor& x, const torch::Tensor& wq, const float* ws, const float* wz, const float* smooth,
         torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0);
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  std::vector<float> a(M), rowsum(M);
  const T* xp = x.data_ptr<T>();
  int8_t* qp = xq.data_ptr<int8_t>();
#pragma omp parallel
  {
    std::vector<float> buf(K);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) quantize_row(xp + m * K, smooth, K, qp + m * K, &a[m], &rowsum[m], buf.data());
  }
  const auto wt = wq.t();
  T* yp = y.data_ptr<T>();
  // tiles of at most CHUNK_ROWS x cols int32, into one reused buffer: a fresh [M, N] int32 result
  // (12 MB for SmolLM2's head at 64 rows) costs more in page faults than the rescale itself
  const int64_t rows_max = std::min(CHUNK_ROWS, M);
  const int64_t cols = std::min(N, std::max<int64_t>(256, (TILE_INTS / rows_max) / 64 * 64));
  auto acc = torch::empty({rows_max * cols}, x.options().dtype(torch::kInt));
  for (int64_t m0 = 0; m0 < M; m0 += CHUNK_ROWS) {
    const int64_t rows = std::min(CHUNK_ROWS, M - m0);
    for (int64_t n0 = 0; n0 < N; n0 += cols) {
      const int64_t nc = std::min(cols, N - n0);
      auto tile = acc.narrow(0, 0, rows * nc).view({rows, nc});
      at::_int_mm_out(tile, xq.narrow(0, m0, rows), wt.narrow(1, n0, nc));
      const int32_t* ap = tile.data_ptr<int32_t>();
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r)
        rescale_row(ap + r * nc, nc, a[m0 + r], rowsum[m0 + r], ws + n0, wz ? wz + n0 : nullptr,
                    yp + (m0 + r) * N + n0);
    }
  }
}

}  // namespace

torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor ws, c10::optional<torch::Tensor> wz,
                          c10::optional<torch::Tensor> smooth) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "w8a8_linear: x must be a contiguous fp32 or bf16 [rows, in] tensor");
  TORCH_CHECK(wq.dim() == 2 && wq.is_contiguous() && wq.scalar_type() == at::kChar && wq.size(1) == x.size(1),
              "w8a8_linear: weight must be contiguous int8 [out, in] with in = x.size(1)");
  const int64_t N = wq.size(0);
  TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.is_contiguous() && ws.numel() == N, "w8a8_linear: ws must be fp32 [out]");
  const float* zp = nullptr;
  if (wz.has_value()) {
    TORCH_CHECK(wz->scalar_type() == at::kFloat && wz->is_contiguous() && wz->numel() == N, "w8a8_linear: wz must be fp32 [out]");
    zp = wz->data_ptr<float>();
  }
  const float* sp = nullptr;
  if (smooth.has_value()) {
    TORCH_CHECK(smooth->scalar_type() == at::kFloat && smooth->is_contiguous() && smooth->numel() == x.size(1),
                "w8a8_linear: smooth must be fp32 [in]");
    sp = smooth->data_ptr<float>();
  }
  auto y = torch::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0) return y;
  if (x.scalar_type() == at::kFloat) run<float>(x, wq, ws.data_ptr<float>(), zp, sp, y);
  else run<at::BFloat16>(x, wq, ws.data_ptr<float>(), zp, sp, y);
  return y;
}
