// Weight-only GEMVs for a few activation rows (decode), fp32 math on the weight as it is stored:
//  - int8_rows_gemv: --quant int8's per-row int8 (signed bytes, fp32 scale and zero per row, quant_ops'
//    "int8pack"), y[m, n] = scale[n] * (x[m] . q[n]) + zero[n] * sum(x[m]); also in pieces
//    (rows_prepare / int8_rows_gemv_range) for decode_stack.cpp's one parallel region;
//  - bf16_gemv: a bf16 weight (the LM head, which keeps its plain weight beside oneDNN's packed copy).
// Four weight rows a tile, each widened to floats once per tile of up to six activation rows, each thread
// prefetching the tiles four ahead into L2. Callers pick the row counts where this wins (quant_ops'
// INT8_GEMV_MAX_ROWS, kernels/__init__'s BF16_GEMV_MAX_ROWS): its cost grows with the rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>
#include "avx512_common.h"
#include "fused_ops.h"

// --quant int8's weight for decode-sized batches, read as it is stored: y[m, n] = scale[n] * (x[m] . q[n])
// + zero[n] * sum(x[m]), in fp32 (the activations stay floats: weight-only int8, exact up to fp32
// summation order). Four weight rows at a time, each 16 bytes widened to floats once per tile of up to
// six activation rows; one parallel region over the weight rows (or, through rows_prepare /
// int8_rows_gemv_range, decode_stack.cpp's). Its cost grows with the rows, so quant_ops uses it up to
// INT8_GEMV_MAX_ROWS; torch's _weight_int8pack_mm, which it replaces there, was 2x slower at one row on
// SmolLM2's layers and rounds in bf16.
namespace {
constexpr int GEMV_NR = 4;  // weight rows a tile
constexpr int64_t GEMV_PF = 4;  // tiles prefetched ahead

#ifdef __AVX512F__
// 16 weights from k as floats: int8, or bf16 (its bits are a float's top half)
inline __m512 load16w(const int8_t* p, __mmask16 in) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(in, p))); }
inline __m512 load16w(const at::BFloat16* p, __mmask16 in) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, p)), 16));
}
#endif

// dot[m][r] = x[m] . q[r] for MT activation rows (compile-time, so the sums stay in registers)
// pf: the rows GEMV_PF tiles ahead (or nullptr), prefetched into L2 a line at a time as this tile goes:
// without it one thread streamed the weights at ~7 GB/s, latency-bound
template <int MT, typename TW>
inline void gemv_tile(const float* x, int64_t K, const TW* q, const TW* pf, float (*dot)[GEMV_NR]) {
#ifdef __AVX512F__
  constexpr int64_t LINE = 64 / sizeof(TW);  // weights a cache line
  __m512 acc[MT][GEMV_NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < GEMV_NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 in = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
    if (pf && k % LINE == 0)
      for (int r = 0; r < GEMV_NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(pf + r * K + k), _MM_HINT_T1);
    __m512 w[GEMV_NR];
    for (int r = 0; r < GEMV_NR; ++r) w[r] = load16w(q + r * K + k, in);
    for (int m = 0; m < MT; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(in, x + m * K + k);
      for (int r = 0; r < GEMV_NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, w[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < GEMV_NR; ++r) dot[m][r] = _mm512_reduce_add_ps(acc[m][r]);
#else
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < GEMV_NR; ++r) {
      float a = 0.f;
      for (int64_t k = 0; k < K; ++k) a += x[m * K + k] * static_cast<float>(q[r * K + k]);
      dot[m][r] = a;
    }
#endif
}

// weight rows [4 * b0, min(4 * b1, N)) of y = x @ q.T * s + sum(x) * z (s, z null: y = x @ q.T)
template <typename TO, typename TW>
void gemv_blocks(const RowActs& a, const TW* q, const float* s, const float* z, int64_t N, TO* y,
                 int64_t b0, int64_t b1) {
  constexpr int MT = 6;
  const int64_t M = a.M, K = a.K;
  const float* x = a.x.data();
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n0 = b * GEMV_NR, nr = std::min<int64_t>(GEMV_NR, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
      const int64_t mt = std::min<int64_t>(MT, M - m0);
      float dot[MT][GEMV_NR] = {};
      if (nr < GEMV_NR) {  // the last rows when N % 4 != 0
        for (int m = 0; m < mt; ++m)
          for (int r = 0; r < nr; ++r)
            for (int64_t k = 0; k < K; ++k) dot[m][r] += x[(m0 + m) * K + k] * static_cast<float>(q[(n0 + r) * K + k]);
      } else {
        const float* xm = x + m0 * K;
        const TW* qn = q + n0 * K;
        const TW* pf = m0 == 0 && n0 + (GEMV_PF + 1) * GEMV_NR <= N ? qn + GEMV_PF * GEMV_NR * K : nullptr;
        switch (mt) {
          case 1: gemv_tile<1, TW>(xm, K, qn, pf, dot); break;
          case 2: gemv_tile<2, TW>(xm, K, qn, pf, dot); break;
          case 3: gemv_tile<3, TW>(xm, K, qn, pf, dot); break;
          case 4: gemv_tile<4, TW>(xm, K, qn, pf, dot); break;
          case 5: gemv_tile<5, TW>(xm, K, qn, pf, dot); break;
          default: gemv_tile<6, TW>(xm, K, qn, pf, dot);
        }
      }
      for (int m = 0; m < mt; ++m)
        for (int r = 0; r < nr; ++r)
          y[(m0 + m) * N + n0 + r] = static_cast<TO>(s ? s[n0 + r] * dot[m][r] + z[n0 + r] * a.sum[m0 + m] : dot[m][r]);
    }
  }
}

template <typename TW>
void gemv_blocks_any(const RowActs& a, const TW* q, int64_t N, const float* s, const float* z, torch::Tensor& y,
                     int64_t b0, int64_t b1) {
  if (y.scalar_type() == at::kFloat) gemv_blocks(a, q, s, z, N, y.data_ptr<float>(), b0, b1);
  else gemv_blocks(a, q, s, z, N, y.data_ptr<at::BFloat16>(), b0, b1);
}

// x [rows, K] (fp32 or bf16) times the weight q [N, K]: one parallel region over its 4-row tiles
template <typename TW>
torch::Tensor run_rows(const char* name, const torch::Tensor& x, const TW* q, int64_t N, int64_t K, const float* s,
                       const float* z) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              name, ": x must be fp32 or bf16 [rows, in]");
  auto y = torch::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0) return y;
  RowActs a;
  rows_prepare(x, a);
  at::parallel_for(0, (N + GEMV_NR - 1) / GEMV_NR, 8, [&](int64_t b0, int64_t b1) { gemv_blocks_any(a, q, N, s, z, y, b0, b1); });
  return y;
}
}  // namespace

void rows_prepare(const torch::Tensor& x, RowActs& a) {
  const auto xf = x.to(at::kFloat).contiguous();
  a.M = x.size(0), a.K = x.size(1);
  a.x.assign(xf.data_ptr<float>(), xf.data_ptr<float>() + a.M * a.K);
  a.sum.assign(a.M, 0.f);
  for (int64_t m = 0; m < a.M; ++m) {
    float t = 0.f;
    for (int64_t k = 0; k < a.K; ++k) t += a.x[m * a.K + k];
    a.sum[m] = t;
  }
}

void int8_rows_gemv_range(const RowActs& a, const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& z,
                          torch::Tensor& y, int64_t n0, int64_t n1) {
  if (n1 > n0)
    gemv_blocks_any(a, q.data_ptr<int8_t>(), q.size(0), s.data_ptr<float>(), z.data_ptr<float>(), y, n0 / GEMV_NR,
                    (n1 + GEMV_NR - 1) / GEMV_NR);
}

torch::Tensor int8_rows_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor zero) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar, "int8_rows_gemv: q must be contiguous int8 [out, in]");
  const int64_t N = q.size(0);
  TORCH_CHECK(scale.numel() == N && zero.numel() == N, "int8_rows_gemv: one scale and zero per row");
  const auto s = scale.to(at::kFloat).contiguous(), z = zero.to(at::kFloat).contiguous();
  return run_rows("int8_rows_gemv", x, q.data_ptr<int8_t>(), N, q.size(1), s.data_ptr<float>(), z.data_ptr<float>());
}

// A bf16 weight [out, in] at a few rows, the same tiles and prefetch (fp32 math): oneDNN's prepacked
// bf16 matmul read SmolLM2's head at ~25 GB/s at one row
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16, "bf16_gemv: w must be contiguous bf16 [out, in]");
  return run_rows("bf16_gemv", x, w.data_ptr<at::BFloat16>(), w.size(0), w.size(1), nullptr, nullptr);
}
