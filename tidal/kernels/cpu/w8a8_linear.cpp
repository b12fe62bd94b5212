// W8A8 linear for batches (--quant w8a8): int8 weights with one scale per output row, activations
// rounded to int8 per row at run time (dynamic, symmetric), the int8 x int8 -> int32 GEMM done by
// oneDNN through at::_int_mm (AVX-512 VNNI: twice bf16's multiply rate on a CPU without AMX), and
// the rescale fused here, tile by tile:
//   y[m, n] = acc[m, n] * a[m] * ws[n]  (+ rowsum(x)[m] * wz[n] where the weights have a zero point)
// with a[m] = max|x[m, :]| / 127. With `smooth` (SmoothQuant, model/smooth.py), x is first multiplied
// by smooth[k] per input channel (the weight's columns were divided by it before rounding).
// The GEMM runs in tiles of rows and columns so each tile's int32
// result is rescaled while it is still in cache. tests/test_w8a8.py compares it with the same arithmetic in torch.
//
// w8a8_vnni_pack / w8a8_vnni: the same arithmetic with tidal's own AVX-512 VNNI GEMM on a weight packed
// once at load, where the CPU has VNNI (w8a8_vnni_supported). oneDNN reorders the [out, in] weight into
// its own blocked layout on every call, which dominates at decode's few rows and costs ~15% at a
// thousand; packed once, SmolLM2's layers run 1.7-2.6x faster at 4-64 rows and 1.15x at 1,024.
// Layout: panels of 48 output columns; in each panel, for every 4 inputs k..k+3, 48 x 4 bytes
// (column-major within the 4), i.e. [ceil(out/48), ceil(in/4), 48, 4] int8, zero-padded. vpdpbusd
// multiplies unsigned by signed bytes, so activations are stored as q + 128 and 128 * sum_k w[n, k]
// ("comp", packed alongside) is subtracted from each int32 sum. A tile is 8 rows x 48 columns of int32
// in 24 registers; the two threads split the panels, and each prefetches its next panel into L2
// while the first tile of the current one streams it, as the int4 GEMV does.
// Also --quant int8's per-row weight (signed bytes, fp32 scale and zero per row) outside w8a8 as floats
// for prefill's GEMM: int8_rows_dequant (its decode GEMV is rows_gemv.cpp).
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include "avx512_common.h"
#include "fused_ops.h"
#include "int4_linear.h"   // TIDAL_VNNI

namespace {

constexpr int64_t CHUNK_ROWS = 128;
constexpr int64_t TILE_INTS = 1 << 18;   // 1 MiB of int32 results per tile

template <typename T>
inline float load_f32(const T* p) { return static_cast<float>(*p); }

// one row: xq = round(x / a), a = max|x| / 127 (1 for an all-zero row), sum = sum(x), where x is
// the row times `smooth` per channel when given
// Q = int8_t: round(x / a); Q = uint8_t: round(x / a) + 128, for vpdpbusd's unsigned operand
template <typename T, typename Q = int8_t>
void quantize_row(const T* x, const float* smooth, int64_t K, Q* q, float* a, float* sum, float* buf) {
  float amax = 0.f, s = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float v = smooth ? load_f32(x + k) * smooth[k] : load_f32(x + k);
    buf[k] = v;
    amax = std::max(amax, std::fabs(v));
    s += v;
  }
  const float step = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / step;
  constexpr int32_t offset = std::is_same_v<Q, uint8_t> ? 128 : 0;
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<Q>(static_cast<int32_t>(std::nearbyint(buf[k] * inv)) + offset);
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

// the optional zero-point and smoothing vectors, checked
struct Extras {
  const float* wz = nullptr;
  const float* smooth = nullptr;
};

Extras check_extras(const torch::Tensor& x, int64_t N, const torch::Tensor& ws, const c10::optional<torch::Tensor>& wz,
                    const c10::optional<torch::Tensor>& smooth) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "w8a8_linear: x must be a contiguous fp32 or bf16 [rows, in] tensor");
  TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.is_contiguous() && ws.numel() == N, "w8a8_linear: ws must be fp32 [out]");
  Extras e;
  if (wz.has_value()) {
    TORCH_CHECK(wz->scalar_type() == at::kFloat && wz->is_contiguous() && wz->numel() == N, "w8a8_linear: wz must be fp32 [out]");
    e.wz = wz->data_ptr<float>();
  }
  if (smooth.has_value()) {
    TORCH_CHECK(smooth->scalar_type() == at::kFloat && smooth->is_contiguous() && smooth->numel() == x.size(1),
                "w8a8_linear: smooth must be fp32 [in]");
    e.smooth = smooth->data_ptr<float>();
  }
  return e;
}

#ifdef TIDAL_VNNI
// 16 floats -> bf16, rounded to nearest even (vcvtneps2bf16 where the CPU has AVX512-BF16)
inline __m256i cvt_bf16(__m512 v) {
#ifdef TIDAL_AVX512_BF16
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i i = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(i, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16));
#endif
}

constexpr int64_t NP = 48;      // output columns per panel: 3 registers of int32
constexpr int64_t PB = NP * 4;  // a panel's bytes per group of 4 inputs
constexpr int64_t MC = 96;      // rows per pass over the panels (their int8 rows stay in L2)
constexpr int MR = 8;           // rows per tile: 8 x 3 int32 accumulators

// one tile: MR rows of xu (q + 128, rows ldx apart) x one panel, rescaled and stored; `next` (or null):
// the panel to prefetch into L2 meanwhile
template <int R>
void tile(const uint8_t* xu, int64_t ldx, const int8_t* wp, int64_t KG, const int8_t* next, const int32_t* comp,
          const float* a, const float* rs, const float* ws, const float* wz, int64_t n0, int64_t N, void* y, bool bf,
          int64_t ldy) {
  __m512i acc[R][3];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = acc[r][2] = _mm512_setzero_si512();
  for (int64_t g = 0; g < KG; ++g) {
    const int8_t* w = wp + g * PB;
    const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64), w2 = _mm512_loadu_si512(w + 128);
    if (next) {
      for (int64_t b = 0; b < PB; b += 64) _mm_prefetch(reinterpret_cast<const char*>(next + g * PB + b), _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i b = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xu + r * ldx + 4 * g));
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], b, w0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], b, w1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], b, w2);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 va = _mm512_set1_ps(a[r]), vr = _mm512_set1_ps(rs[r]);
    for (int j = 0; j < 3; ++j) {
      const int64_t n = n0 + 16 * j;
      if (n >= N) break;
      const __mmask16 mk = N - n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (N - n)) - 1);
      __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][j], _mm512_loadu_si512(comp + n)));
      v = _mm512_mul_ps(_mm512_mul_ps(v, va), _mm512_maskz_loadu_ps(mk, ws + n));
      if (wz) v = _mm512_fmadd_ps(vr, _mm512_maskz_loadu_ps(mk, wz + n), v);
      if (bf) {
        _mm256_mask_storeu_epi16(static_cast<at::BFloat16*>(y) + r * ldy + n, mk, cvt_bf16(v));
      } else {
        _mm512_mask_storeu_ps(static_cast<float*>(y) + r * ldy + n, mk, v);
      }
    }
  }
}

using TileFn = decltype(&tile<1>);
constexpr TileFn TILES[MR + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>};

template <typename T>
void run_vnni(const torch::Tensor& x, const int8_t* wp, int64_t P, int64_t KG, const int32_t* comp, const float* ws,
              const Extras& e, torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), Kp = KG * 4;
  std::vector<uint8_t> xu(M * Kp, 0);   // the padding inputs meet zero weights
  std::vector<float> a(M), rowsum(M);
  const T* xp = x.data_ptr<T>();
#pragma omp parallel
  {
    std::vector<float> buf(K);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m)
      quantize_row<T, uint8_t>(xp + m * K, e.smooth, K, xu.data() + m * Kp, &a[m], &rowsum[m], buf.data());
  }
  const bool bf = std::is_same_v<T, at::BFloat16>;
  T* yp = y.data_ptr<T>();
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t rows = std::min(MC, M - m0);
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < P; ++p) {
      const int8_t* panel = wp + p * KG * PB;
      const int8_t* next = p + 1 < P ? panel + KG * PB : nullptr;
      for (int64_t r0 = 0; r0 < rows; r0 += MR) {
        const int64_t m = m0 + r0;
        TILES[std::min<int64_t>(MR, rows - r0)](xu.data() + m * Kp, Kp, panel, KG, r0 == 0 ? next : nullptr, comp,
                                                a.data() + m, rowsum.data() + m, ws, e.wz, p * NP, N, yp + m * N, bf, N);
      }
    }
  }
}
#endif

}  // namespace

bool w8a8_vnni_supported() {
#ifdef TIDAL_VNNI
  return true;
#else
  return false;
#endif
}

std::vector<torch::Tensor> w8a8_vnni_pack(torch::Tensor wq) {
  TORCH_CHECK(wq.dim() == 2 && wq.is_contiguous() && wq.scalar_type() == at::kChar, "w8a8_vnni_pack: weight must be contiguous int8 [out, in]");
#ifdef TIDAL_VNNI
  const int64_t N = wq.size(0), K = wq.size(1), P = (N + NP - 1) / NP, KG = (K + 3) / 4;
  TORCH_CHECK(K <= 65536, "w8a8_vnni_pack: at most 65,536 inputs (the int32 sums would overflow)");
  auto packed = torch::zeros({P, KG, PB}, wq.options());
  auto comp = torch::zeros({P * NP}, wq.options().dtype(torch::kInt));
  const int8_t* w = wq.data_ptr<int8_t>();
  int8_t* pp = packed.data_ptr<int8_t>();
  int32_t* cp = comp.data_ptr<int32_t>();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) {
      s += w[n * K + k];
      pp[((n / NP) * KG + k / 4) * PB + (n % NP) * 4 + k % 4] = w[n * K + k];
    }
    cp[n] = 128 * s;
  }
  return {packed, comp};
#else
  TORCH_CHECK(false, "w8a8_vnni_pack: this build has no AVX-512 VNNI (check w8a8_vnni_supported())");
#endif
}

torch::Tensor w8a8_vnni(torch::Tensor x, torch::Tensor packed, torch::Tensor comp, torch::Tensor ws,
                        c10::optional<torch::Tensor> wz, c10::optional<torch::Tensor> smooth) {
  const int64_t N = ws.numel();
  const Extras e = check_extras(x, N, ws, wz, smooth);
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kChar &&
              packed.size(1) == (x.size(1) + 3) / 4 && packed.size(0) * 48 >= N && comp.scalar_type() == at::kInt &&
              comp.numel() == packed.size(0) * 48, "w8a8_vnni: weight and comp must come from w8a8_vnni_pack for this input size");
  auto y = torch::empty({x.size(0), N}, x.options());
#ifdef TIDAL_VNNI
  if (x.size(0) == 0) return y;
  const int8_t* wp = packed.data_ptr<int8_t>();
  if (x.scalar_type() == at::kFloat) run_vnni<float>(x, wp, packed.size(0), packed.size(1), comp.data_ptr<int32_t>(), ws.data_ptr<float>(), e, y);
  else run_vnni<at::BFloat16>(x, wp, packed.size(0), packed.size(1), comp.data_ptr<int32_t>(), ws.data_ptr<float>(), e, y);
  return y;
#else
  TORCH_CHECK(false, "w8a8_vnni: this build has no AVX-512 VNNI (check w8a8_vnni_supported())");
#endif
}

// --quant int8's weight (quant_ops' "int8pack": signed bytes, one scale and zero per row) as floats for
// prefill-sized batches: out[n, k] = q[n, k] * scale[n] + zero[n], in out's dtype (fp32 or bf16)
void int8_rows_dequant(torch::Tensor q, torch::Tensor scale, torch::Tensor zero, torch::Tensor out) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar, "int8_rows_dequant: q must be contiguous int8 [out, in]");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(scale.numel() == N && zero.numel() == N, "int8_rows_dequant: one scale and zero per row");
  TORCH_CHECK(out.is_contiguous() && out.numel() == N * K && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "int8_rows_dequant: out must be contiguous fp32 or bf16 with q's size");
  const auto s = scale.to(at::kFloat).contiguous(), z = zero.to(at::kFloat).contiguous();
  const float *sp = s.data_ptr<float>(), *zp = z.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const bool bf = out.scalar_type() == at::kBFloat16;
  float* of = bf ? nullptr : out.data_ptr<float>();
  at::BFloat16* ob = bf ? out.data_ptr<at::BFloat16>() : nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float a = sp[n], b = zp[n];
    const int8_t* r = qp + n * K;
    if (bf) {
      for (int64_t k = 0; k < K; ++k) ob[n * K + k] = static_cast<at::BFloat16>(static_cast<float>(r[k]) * a + b);
    } else {
      for (int64_t k = 0; k < K; ++k) of[n * K + k] = static_cast<float>(r[k]) * a + b;
    }
  }
}

torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor ws, c10::optional<torch::Tensor> wz,
                          c10::optional<torch::Tensor> smooth) {
  TORCH_CHECK(wq.dim() == 2 && wq.is_contiguous() && wq.scalar_type() == at::kChar, "w8a8_linear: weight must be contiguous int8 [out, in]");
  const int64_t N = wq.size(0);
  const Extras e = check_extras(x, N, ws, wz, smooth);
  TORCH_CHECK(wq.size(1) == x.size(1), "w8a8_linear: weight [out, in] needs in = x.size(1)");
  const float* zp = e.wz;
  const float* sp = e.smooth;
  auto y = torch::empty({x.size(0), N}, x.options());
  if (x.size(0) == 0) return y;
  if (x.scalar_type() == at::kFloat) run<float>(x, wq, ws.data_ptr<float>(), zp, sp, y);
  else run<at::BFloat16>(x, wq, ws.data_ptr<float>(), zp, sp, y);
  return y;
}
