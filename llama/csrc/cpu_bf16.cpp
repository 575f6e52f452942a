// The bf16 work of a CPU decode step, as torch ops under llama_cpu:: (built and loaded by
// llama/cpu.py on AVX-512 BF16 CPUs). Each does in one call what the model's PyTorch code does in
// several operators, in float32 with the bf16 roundings of the code it replaces (tests/test_cpu.py
// bounds each against float64):
// - gemv_bf16: x W^T for up to 4 rows and Meta's row-major weight, streaming W once at the memory's
//   read speed; a row's result does not depend on the other rows in the batch.
// - rms_norm_bf16: RMSNorm, normalised in float32, rounded, then scaled by the weight.
// - rope_bf16: the interleaved complex rotation of q and k.
// - attend_one_bf16: softmax(q k^T / sqrt(D)) v for one new token over the cached positions.
// - gemv_int8: x (w q)^T for up to 4 rows and llama.quantize's int8 weights w (one scale per output
//   row); each x row is rounded to int16 with its own scale (15 bits, where bf16 holds 8), so that
//   int8 x int16 products sum in integers (AVX-512 VNNI) at the memory's speed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <cmath>
#include <vector>
#include <immintrin.h>
#include <torch/library.h>

namespace {

// U independent sums per row hide the latency of the dot-product instruction.
template <int M, int U>
void rows(const uint16_t* x, const uint16_t* w, int64_t K, int64_t N, c10::BFloat16* y, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; n++) {
    const uint16_t* wn = w + n * K;
    __m512 acc[M][U];
    for (int m = 0; m < M; m++)
      for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U)
      for (int u = 0; u < U; u++) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(wn + k + 32 * u);
        for (int m = 0; m < M; m++)
          acc[m][u] = _mm512_dpbf16_ps(acc[m][u], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * u));
      }
    for (; k < K; k += 32) {  // the tail, zero-padded by masked loads
      __mmask32 mask = K - k >= 32 ? ~(__mmask32)0 : (__mmask32)((1u << (K - k)) - 1);
      __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, wn + k);
      for (int m = 0; m < M; m++)
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k));
    }
    for (int m = 0; m < M; m++) {
      __m512 s = acc[m][0];
      for (int u = 1; u < U; u++) s = _mm512_add_ps(s, acc[m][u]);
      y[m * N + n] = c10::BFloat16(_mm512_reduce_add_ps(s));  // round to nearest even, as ATen does
    }
  }
}

template <int M>
void run(const uint16_t* x, const uint16_t* w, int64_t K, int64_t N, c10::BFloat16* y) {
  constexpr int U = M <= 2 ? 4 : 2;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) { rows<M, U>(x, w, K, N, y, begin, end); });
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "gemv_bf16: bf16 tensors only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.dim() == 2 && x.size(-1) == w.size(1), "gemv_bf16: bad layout");
  int64_t K = w.size(1), N = w.size(0), M = K ? x.numel() / K : 0;
  TORCH_CHECK(1 <= M && M <= 4, "gemv_bf16: 1 to 4 rows, got ", M);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  auto xp = (const uint16_t*)x.data_ptr(), wp = (const uint16_t*)w.data_ptr();
  auto yp = y.data_ptr<c10::BFloat16>();
  switch (M) {
    case 1: run<1>(xp, wp, K, N, yp); break;
    case 2: run<2>(xp, wp, K, N, yp); break;
    case 3: run<3>(xp, wp, K, N, yp); break;
    default: run<4>(xp, wp, K, N, yp); break;
  }
  return y;
}

inline float f32(c10::BFloat16 v) { return static_cast<float>(v); }

at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& w, double eps) {
  int64_t D = w.numel();
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "rms_norm_bf16: bf16 tensors only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.size(-1) == D, "rms_norm_bf16: bad layout");
  at::Tensor y = at::empty_like(x);
  auto xp = x.data_ptr<c10::BFloat16>(), wp = w.data_ptr<c10::BFloat16>(), yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, x.numel() / D, std::max<int64_t>(1, 65536 / D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const c10::BFloat16* xr = xp + r * D;
      float sum = 0;
      for (int64_t i = 0; i < D; i++) sum += f32(xr[i]) * f32(xr[i]);
      float scale = 1.0f / std::sqrt(sum / D + static_cast<float>(eps));
      for (int64_t i = 0; i < D; i++)  // x * rsqrt(...) rounded to bf16, then times the weight, rounded
        yp[r * D + i] = c10::BFloat16(f32(c10::BFloat16(f32(xr[i]) * scale)) * f32(wp[i]));
    }
  });
  return y;
}

// x [B, T, H, D] rotated by freqs [T, D/2, 2] (cos, sin as float32 pairs): (x0 + i x1) * (c + i s).
at::Tensor rotate(const at::Tensor& x, const at::Tensor& freqs) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 4, "rope_bf16: bad q or k");
  int64_t B = x.size(0), T = x.size(1), HD = x.size(2) * x.size(3), D = x.size(3);
  at::Tensor y = at::empty_like(x);
  auto xp = x.data_ptr<c10::BFloat16>(), yp = y.data_ptr<c10::BFloat16>();
  auto fp = freqs.data_ptr<float>();
  at::parallel_for(0, B * T, std::max<int64_t>(1, 65536 / HD), [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; bt++) {
      const float* f = fp + (bt % T) * D;
      for (int64_t j = 0; j < HD; j += 2) {
        float a = f32(xp[bt * HD + j]), b = f32(xp[bt * HD + j + 1]), c = f[j % D], s = f[j % D + 1];
        yp[bt * HD + j] = c10::BFloat16(a * c - b * s);
        yp[bt * HD + j + 1] = c10::BFloat16(a * s + b * c);
      }
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> rope_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& freqs) {
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.is_contiguous() && freqs.size(0) == q.size(1) &&
              freqs.size(1) * 2 == q.size(3), "rope_bf16: freqs must be [T, D/2, 2] float32");
  return {rotate(q, freqs), rotate(k, freqs)};
}

// e^x for x <= 0, to float32's precision: 2^n e^f with |f| <= ln2/2 and a degree-7 Taylor polynomial.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // e^-104 is below float32's smallest value: 0
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), f);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// n <= 16 bf16 values from p as float32 lanes (the rest zero).
inline __m512 load16(const c10::BFloat16* p, int64_t n) {
  __mmask16 mask = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
  __m256i v = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// The 16 horizontal sums of v[0..15], in that order, by a butterfly of in-lane and cross-lane adds.
inline __m512 sum16(const __m512* v) {
  __m512 x[8], z[4];
  for (int i = 0; i < 8; i++)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++)
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
  __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// One (batch row, head) of attend_one_bf16, with D = 16 CH so that q and the sums stay in registers.
template <int CH>
void attend_head(const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v, int64_t S, int64_t sk,
                 int64_t sv, float* p, c10::BFloat16* out) {
  constexpr int P = (CH + 1) / 2;  // 32-wide pairs of q; an odd CH leaves the last half zero
  __m512bh qv[P];
  __mmask32 masks[P];
  for (int c = 0; c < P; c++) {
    masks[c] = 2 * c + 1 < CH ? ~(__mmask32)0 : (__mmask32)0xffff;
    qv[c] = (__m512bh)_mm512_maskz_loadu_epi16(masks[c], q + 32 * c);
  }
  const __m512 root = _mm512_set1_ps(std::sqrt(16.0f * CH));
  int64_t blocks = (S + 15) / 16;
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t blk = 0; blk < blocks; blk++) {  // scores q . k_s / sqrt(D), 16 positions at a time
    __m512 dots[16];
    for (int j = 0; j < 16; j++) {
      const c10::BFloat16* ks = k + std::min(blk * 16 + j, S - 1) * sk;  // past S: the last again, masked below
      dots[j] = _mm512_setzero_ps();
      for (int c = 0; c < P; c++)
        dots[j] = _mm512_dpbf16_ps(dots[j], qv[c], (__m512bh)_mm512_maskz_loadu_epi16(masks[c], ks + 32 * c));
    }
    __mmask16 live = S - blk * 16 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (S - blk * 16)) - 1);
    __m512 sc = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), _mm512_div_ps(sum16(dots), root));
    _mm512_storeu_ps(p + blk * 16, sc);
    top = _mm512_max_ps(top, sc);
  }
  __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top)), total = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < blocks; blk++) {  // softmax's numerators and their sum
    __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(p + blk * 16), m));
    _mm512_storeu_ps(p + blk * 16, e);
    total = _mm512_add_ps(total, e);
  }
  __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total)), acc[CH];
  for (int c = 0; c < CH; c++) acc[c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; s++) {  // the probability-weighted sum of the values
    __m512 w = _mm512_mul_ps(_mm512_set1_ps(p[s]), inv);
    for (int c = 0; c < CH; c++) acc[c] = _mm512_fmadd_ps(w, load16(v + s * sv + 16 * c, 16), acc[c]);
  }
  alignas(64) float row[16];
  for (int c = 0; c < CH; c++) {
    _mm512_store_ps(row, acc[c]);
    for (int d = 0; d < 16; d++) out[16 * c + d] = c10::BFloat16(row[d]);
  }
}

using AttendHead = void (*)(const c10::BFloat16*, const c10::BFloat16*, const c10::BFloat16*, int64_t, int64_t,
                            int64_t, float*, c10::BFloat16*);
constexpr AttendHead attend_heads[] = {attend_head<1>, attend_head<2>, attend_head<3>, attend_head<4>,
                                       attend_head<5>, attend_head<6>, attend_head<7>, attend_head<8>};

// q [B, H, 1, D]; keys, values [B, Hkv, S, D] (views of the cache: any strides but D's); out [B, H, 1, D].
// D a multiple of 16, at most 128.
at::Tensor attend_one_bf16(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values) {
  int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = keys.size(1), S = keys.size(2);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
              values.scalar_type() == at::kBFloat16 && q.size(2) == 1 && H % Hkv == 0 && keys.stride(3) == 1 &&
              values.stride(3) == 1 && q.stride(3) == 1 && keys.sizes() == values.sizes() && S >= 1 &&
              D % 16 == 0 && D <= 128, "attend_one_bf16: bad layout");
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  auto qp = q.data_ptr<c10::BFloat16>(), kp = keys.data_ptr<c10::BFloat16>(), vp = values.data_ptr<c10::BFloat16>();
  auto op = out.data_ptr<c10::BFloat16>();
  int64_t qb = q.stride(0), qh = q.stride(1), kb = keys.stride(0), kh = keys.stride(1), ks = keys.stride(2);
  int64_t vb = values.stride(0), vh = values.stride(1), vs = values.stride(2), group = H / Hkv;
  AttendHead head = attend_heads[D / 16 - 1];
  at::parallel_for(0, B * H, std::max<int64_t>(1, 32768 / (S * D)), [&](int64_t begin, int64_t end) {
    std::vector<float> p((S + 15) / 16 * 16);
    for (int64_t bh = begin; bh < end; bh++) {
      int64_t b = bh / H, h = bh % H;
      head(qp + b * qb + h * qh, kp + b * kb + h / group * kh, vp + b * vb + h / group * vh, S, ks, vs, p.data(),
           op + bh * D);
    }
  });
  return out;
}

template <int M>
void int8_rows(const int16_t* xq, const float* sx, const int8_t* w, const c10::BFloat16* scales, int64_t K, int64_t N,
               c10::BFloat16* y, int64_t begin, int64_t end) {
  int64_t Kp = (K + 63) / 64 * 64;  // xq rows are zero-padded to this
  for (int64_t n = begin; n < end; n++) {
    const int8_t* wn = w + n * K;
    __m512 total[M];
    for (int m = 0; m < M; m++) total[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K;) {
      // int32 sums of at most 4096 products per row (2 per lane and step) cannot overflow: 128 x 127 x 32767 < 2^31
      __m512i acc[M][2];
      for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
      for (int64_t stop = std::min(K, k + 4096); k < stop; k += 64) {
        __mmask64 mask = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        __m512i v = _mm512_maskz_loadu_epi8(mask, wn + k);
        __m512i lo = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(v)), hi = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(v, 1));
        for (int m = 0; m < M; m++) {
          acc[m][0] = _mm512_dpwssd_epi32(acc[m][0], lo, _mm512_loadu_si512(xq + m * Kp + k));
          acc[m][1] = _mm512_dpwssd_epi32(acc[m][1], hi, _mm512_loadu_si512(xq + m * Kp + k + 32));
        }
      }
      for (int m = 0; m < M; m++) total[m] = _mm512_add_ps(total[m], _mm512_cvtepi32_ps(_mm512_add_epi32(acc[m][0], acc[m][1])));
    }
    float scale = static_cast<float>(scales[n]);
    for (int m = 0; m < M; m++) y[m * N + n] = c10::BFloat16(_mm512_reduce_add_ps(total[m]) * sx[m] * scale);
  }
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kChar && scales.scalar_type() == at::kBFloat16,
              "gemv_int8: bf16 x, int8 w, bf16 scales");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && scales.is_contiguous() && w.dim() == 2 &&
              x.size(-1) == w.size(1) && scales.numel() == w.size(0), "gemv_int8: bad layout");
  int64_t K = w.size(1), N = w.size(0), M = K ? x.numel() / K : 0, Kp = (K + 63) / 64 * 64;
  TORCH_CHECK(1 <= M && M <= 4, "gemv_int8: 1 to 4 rows, got ", M);
  std::vector<int16_t> xq(M * Kp, 0);
  float sx[4];
  auto xp = x.data_ptr<c10::BFloat16>();
  for (int64_t m = 0; m < M; m++) {
    float top = 0;
    for (int64_t k = 0; k < K; k++) top = std::max(top, std::fabs(f32(xp[m * K + k])));
    sx[m] = top > 0 ? top / 32767 : 1.0f;
    for (int64_t k = 0; k < K; k++) xq[m * Kp + k] = static_cast<int16_t>(std::nearbyint(f32(xp[m * K + k]) / sx[m]));
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  auto wp = static_cast<const int8_t*>(w.data_ptr());
  const int16_t* xqp = xq.data();
  auto sp = scales.data_ptr<c10::BFloat16>();
  auto yp = y.data_ptr<c10::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    switch (M) {
      case 1: int8_rows<1>(xqp, sx, wp, sp, K, N, yp, begin, end); break;
      case 2: int8_rows<2>(xqp, sx, wp, sp, K, N, yp, begin, end); break;
      case 3: int8_rows<3>(xqp, sx, wp, sp, K, N, yp, begin, end); break;
      default: int8_rows<4>(xqp, sx, wp, sp, K, N, yp, begin, end); break;
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(llama_cpu, m) {
  m.def("gemv_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("rms_norm_bf16(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope_bf16(Tensor q, Tensor k, Tensor freqs) -> (Tensor, Tensor)");
  m.def("attend_one_bf16(Tensor q, Tensor keys, Tensor values) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor w, Tensor scales) -> Tensor");
}
TORCH_LIBRARY_IMPL(llama_cpu, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("rms_norm_bf16", &rms_norm_bf16);
  m.impl("rope_bf16", &rope_bf16);
  m.impl("attend_one_bf16", &attend_one_bf16);
  m.impl("gemv_int8", &gemv_int8);
}
