// AVX-512 level (F, BW, VL, DQ, VNNI, VPOPCNTDQ, F16C): hand-written kernels.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512vpopcntdq
// -mf16c -mfma; only called after cpuid says the CPU has all of these.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels.h"

namespace onnxopt {
namespace isa_avx512 {
#include "kernels_generic.inc"
#include "x86_helpers.inc"


static inline __mmask16 tail16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

// ---------------------------------------------------------------- Binary
// LUT entry i of group g = sum_j (bit j of i ? +x[4g+j] : -x[4g+j]).
static void binary_lut(const float* x, int64_t K, int64_t KW, float* lut) {
  __m512 S[4];
  for (int j = 0; j < 4; ++j) {
    alignas(64) float s[16];
    for (int i = 0; i < 16; ++i) s[i] = ((i >> j) & 1) ? 1.0f : -1.0f;
    S[j] = _mm512_load_ps(s);
  }
  const int64_t G = KW * 8;
  const int64_t Gfull = K / 4;
  for (int64_t g = 0; g < G; ++g) {
    float x0, x1, x2, x3;
    if (g < Gfull) {
      x0 = x[4 * g]; x1 = x[4 * g + 1]; x2 = x[4 * g + 2]; x3 = x[4 * g + 3];
    } else {
      const int64_t k = 4 * g;
      x0 = k < K ? x[k] : 0.f; x1 = k + 1 < K ? x[k + 1] : 0.f;
      x2 = k + 2 < K ? x[k + 2] : 0.f; x3 = k + 3 < K ? x[k + 3] : 0.f;
    }
    __m512 v = _mm512_mul_ps(_mm512_set1_ps(x0), S[0]);
    __m512 u = _mm512_mul_ps(_mm512_set1_ps(x2), S[2]);
    v = _mm512_fmadd_ps(_mm512_set1_ps(x1), S[1], v);
    u = _mm512_fmadd_ps(_mm512_set1_ps(x3), S[3], u);
    _mm512_storeu_ps(lut + g * 16, _mm512_add_ps(v, u));
  }
}

// RT rows x CB column blocks of 16. Per 32-bit word: 8 nibble lookups (vpermps) per row.
template <int RT, int CB>
static inline void binary_tile(const BinaryParams& p, int64_t m, int64_t cb) {
  const int64_t G16 = p.KW * 8 * 16;
  __m512 acc[RT][CB];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CB; ++c) acc[r][c] = _mm512_setzero_ps();
  const uint32_t* wb[CB];
  for (int c = 0; c < CB; ++c) wb[c] = p.bits + (cb + c) * p.KW * 16;
  const float* lut[RT];
  for (int r = 0; r < RT; ++r) lut[r] = p.lut + (m + r) * G16;
  // GEMV is memory bound: stream the next tile (CB column blocks, contiguous) into L2 meanwhile
  const char* next = reinterpret_cast<const char*>(wb[0] + CB * p.KW * 16);
  for (int64_t w = 0; w < p.KW; ++w) {
    if constexpr (RT == 1) prefetch_l2(next + w * CB * 64, CB * 64);
    __m512i W[CB];
    for (int c = 0; c < CB; ++c) W[c] = _mm512_loadu_si512(wb[c] + w * 16);
#pragma GCC unroll 4
    for (int q = 0; q < 8; q += 2) {
      __m512i i0[CB], i1[CB];
      for (int c = 0; c < CB; ++c) {
        i0[c] = _mm512_srli_epi32(W[c], 4 * q);
        i1[c] = _mm512_srli_epi32(W[c], 4 * q + 4);
      }
      for (int r = 0; r < RT; ++r) {
        const __m512 L0 = _mm512_loadu_ps(lut[r] + (w * 8 + q) * 16);
        const __m512 L1 = _mm512_loadu_ps(lut[r] + (w * 8 + q + 1) * 16);
        for (int c = 0; c < CB; ++c)
          acc[r][c] = _mm512_add_ps(acc[r][c], _mm512_add_ps(_mm512_permutexvar_ps(i0[c], L0),
                                                             _mm512_permutexvar_ps(i1[c], L1)));
      }
    }
  }
  for (int c = 0; c < CB; ++c) {
    const int64_t n0 = (cb + c) * 16;
    const __mmask16 mk = tail16(p.N - n0);
    const __m512 a = _mm512_maskz_loadu_ps(mk, p.alpha + n0);
    const __m512 bi = p.bias ? _mm512_maskz_loadu_ps(mk, p.bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < RT; ++r)
      _mm512_mask_storeu_ps(p.y + (m + r) * p.N + n0, mk, _mm512_fmadd_ps(acc[r][c], a, bi));
  }
}

template <int RT>
static inline void binary_rows(const BinaryParams& p, int64_t m, int64_t c0, int64_t c1) {
  constexpr int CB = RT == 1 ? 4 : 2;
  int64_t cb = c0;
  for (; cb + CB <= c1; cb += CB) binary_tile<RT, CB>(p, m, cb);
  for (; cb < c1; ++cb) binary_tile<RT, 1>(p, m, cb);
}

static void binary_gemm(const BinaryParams& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1) {
  // column chunks so that the weight chunk stays in L2 while row tiles stream their LUTs
  const int64_t chunk = std::max<int64_t>(1, (256 * 1024) / (p.KW * 64));
  for (int64_t cc = c0; cc < c1; cc += chunk) {
    const int64_t ce = std::min(c1, cc + chunk);
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) binary_rows<4>(p, m, cc, ce);
    for (; m + 2 <= m1; m += 2) binary_rows<2>(p, m, cc, ce);
    for (; m < m1; ++m) binary_rows<1>(p, m, cc, ce);
  }
}

// ---------------------------------------------------------------- Xnor
static void xnor_pack_x(const float* x, int64_t K, int64_t KW, uint64_t* xbits, float* beta) {
  __m512 s = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t w = 0; w < KW; ++w) {
    uint64_t word = 0;
    for (int j = 0; j < 4; ++j) {
      const int64_t k = 64 * w + 16 * j;
      const __mmask16 mk = k < K ? tail16(K - k) : (__mmask16)0;
      const __m512 v = _mm512_maskz_loadu_ps(mk, x + (k < K ? k : 0));
      const __mmask16 ge = _mm512_mask_cmp_ps_mask(mk, v, zero, _CMP_GE_OQ);
      word |= (uint64_t)ge << (16 * j);
      s = _mm512_add_ps(s, _mm512_abs_ps(v));
    }
    xbits[w] = word;
  }
  *beta = _mm512_reduce_add_ps(s) / (float)K;
}

template <int RT, int CB>
static inline void xnor_tile(const XnorParams& p, int64_t m, int64_t cb) {
  __m512i acc[RT][CB];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CB; ++c) acc[r][c] = _mm512_setzero_si512();
  const uint64_t* wb[CB];
  for (int c = 0; c < CB; ++c) wb[c] = p.bits + (cb + c) * p.KW * 8;
  const uint64_t* xb[RT];
  for (int r = 0; r < RT; ++r) xb[r] = p.xbits + (m + r) * p.KW;
  const char* next = reinterpret_cast<const char*>(wb[0] + CB * p.KW * 8);
  for (int64_t w = 0; w < p.KW; ++w) {
    if constexpr (RT == 1) prefetch_l2(next + w * CB * 64, CB * 64);
    __m512i W[CB];
    for (int c = 0; c < CB; ++c) W[c] = _mm512_loadu_si512(wb[c] + w * 8);
    for (int r = 0; r < RT; ++r) {
      const __m512i X = _mm512_set1_epi64((long long)xb[r][w]);
      for (int c = 0; c < CB; ++c)
        acc[r][c] = _mm512_add_epi64(acc[r][c], _mm512_popcnt_epi64(_mm512_xor_si512(X, W[c])));
    }
  }
  const __m256 Kf = _mm256_set1_ps((float)p.K);
  for (int c = 0; c < CB; ++c) {
    const int64_t n0 = (cb + c) * 8;
    const int64_t rem = p.N - n0;
    const __mmask8 mk = rem >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << rem) - 1u);
    const __m256 a = _mm256_maskz_loadu_ps(mk, p.alpha + n0);
    const __m256 bi = p.bias ? _mm256_maskz_loadu_ps(mk, p.bias + n0) : _mm256_setzero_ps();
    for (int r = 0; r < RT; ++r) {
      const __m256 cnt = _mm512_cvtepi64_ps(acc[r][c]);
      const __m256 dotv = _mm256_fnmadd_ps(_mm256_set1_ps(2.0f), cnt, Kf);  // K - 2 cnt
      const __m256 ab = _mm256_mul_ps(a, _mm256_set1_ps(p.beta[m + r]));
      _mm256_mask_storeu_ps(p.y + (m + r) * p.N + n0, mk, _mm256_fmadd_ps(ab, dotv, bi));
    }
  }
}

template <int RT>
static inline void xnor_rows(const XnorParams& p, int64_t m, int64_t c0, int64_t c1) {
  constexpr int CB = RT == 1 ? 4 : 3;
  int64_t cb = c0;
  for (; cb + CB <= c1; cb += CB) xnor_tile<RT, CB>(p, m, cb);
  for (; cb < c1; ++cb) xnor_tile<RT, 1>(p, m, cb);
}

static void xnor_gemm(const XnorParams& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1) {
  const int64_t chunk = std::max<int64_t>(3, ((128 * 1024) / (p.KW * 64)) / 3 * 3);
  for (int64_t cc = c0; cc < c1; cc += chunk) {
    const int64_t ce = std::min(c1, cc + chunk);
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) xnor_rows<4>(p, m, cc, ce);
    for (; m < m1; ++m) xnor_rows<1>(p, m, cc, ce);
  }
}

// ---------------------------------------------------------------- Sparse
template <ValType VT>
static inline __m512 load_vals(const void* v, int64_t j, __mmask16 mk) {
  if constexpr (VT == ValType::F32) {
    return _mm512_maskz_loadu_ps(mk, static_cast<const float*>(v) + j);
  } else if constexpr (VT == ValType::F16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(v) + j));
  } else {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, static_cast<const int8_t*>(v) + j)));
  }
}


// Panel GEMV: per step one vpmovzxbd of the 16 lane rows, one vpermt2ps gathering their inputs
// from the panel's two registers, one FMA. Four accumulators rotate over the panels so the FMA
// chains of consecutive segments overlap. MNIST fc1 (1568x512, 90 %, 9.0 k steps for 78 k
// nonzeros), standalone on Zen 4: 9.4 us against 20.5 us for the row walk over its post-ReLU input.
// Rows sorted by density: 16 inputs per gather (a scalar loop cost ~0.9 us at K = 1568 inside the
// MNIST CNN, a tenth of the whole sparse layer).
static void sparse_panel_input(const SparsePanels& w, const float* x, int64_t K, float* xp) {
  if (w.rows_in_order) {
    std::copy(x, x + K, xp);
  } else {
    for (int64_t i = 0; i < K; i += 16) {
      const __mmask16 m = tail16(K - i);
      const __m512i rows = _mm512_maskz_loadu_epi32(m, w.row_of + i);
      _mm512_store_ps(xp + i, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, rows, x, 4));
    }
  }
  std::fill(xp + K, xp + 32 * w.P, 0.0f);
}

static void sparse_panels(const SparsePanels& w, const float* xp, const float* bias, int64_t g0, int64_t g1, float* y) {
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* steps = w.steps + g * w.P;
    const uint8_t* rows = w.rows + 16 * w.group_step[g];
    const float* vals = w.values + 16 * w.group_step[g];
    auto segment = [&](int64_t p, __m512& acc) {
      const __m512 lo = _mm512_load_ps(xp + 32 * p), hi = _mm512_load_ps(xp + 32 * p + 16);
      for (int l = steps[p]; l > 0; --l, rows += 16, vals += 16) {
        const __m512i r = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows)));
        acc = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, r, hi), _mm512_loadu_ps(vals), acc);
      }
    };
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t p = 0;
    for (; p + 4 <= w.P; p += 4) {
      segment(p, a0);
      segment(p + 1, a1);
      segment(p + 2, a2);
      segment(p + 3, a3);
    }
    for (; p < w.P; ++p) segment(p, a0);
    alignas(64) float out[16];
    _mm512_store_ps(out, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (int i = 0; i < 16; ++i) {
      const int32_t n = w.col_of[16 * g + i];
      if (n >= 0) y[n] = out[i] + (bias ? bias[n] : 0.0f);
    }
  }
}

// Transposed path: X^T in groups of 32 rows ([group][K][32], L2-resident, 64-byte aligned rows);
// per column one pass over its entries, each = broadcast value x two 16-float rows; two entries
// per step into 4 accumulators. Measured (4096x4096, 90% sparse, one group of 32 rows): ~0.8 ns
// per entry, bound by L2->L1 traffic (128 B per entry); tiling K so the X^T slice stays in L1
// was slower (1.4 ns/entry at 256-row tiles: ~25 entries per (column, tile) segment, and every
// segment's variable-length loop costs a branch misprediction).
template <ValType VT, class IT>
static void sparse_xt_t(const SparseParams& p, int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
  const IT* idx = static_cast<const IT*>(p.indices);
  for (int64_t t = t0; t < t1; ++t) {
    const float* xg = p.xt + t * p.K * 32;
    for (int64_t n = n0; n < n1; ++n) {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
      const int64_t e1 = p.col_ptr[n + 1];
      int64_t j = p.col_ptr[n];
      for (; j + 2 <= e1; j += 2) {
        const __m512 v0 = _mm512_set1_ps(scalar_val<VT>(p.values, j));
        const __m512 v1 = _mm512_set1_ps(scalar_val<VT>(p.values, j + 1));
        const float* x0 = xg + (int64_t)idx[j] * 32;
        const float* x1 = xg + (int64_t)idx[j + 1] * 32;
        a0 = _mm512_fmadd_ps(v0, _mm512_load_ps(x0), a0);
        a1 = _mm512_fmadd_ps(v0, _mm512_load_ps(x0 + 16), a1);
        c0 = _mm512_fmadd_ps(v1, _mm512_load_ps(x1), c0);
        c1 = _mm512_fmadd_ps(v1, _mm512_load_ps(x1 + 16), c1);
      }
      if (j < e1) {
        const __m512 v0 = _mm512_set1_ps(scalar_val<VT>(p.values, j));
        const float* x0 = xg + (int64_t)idx[j] * 32;
        a0 = _mm512_fmadd_ps(v0, _mm512_load_ps(x0), a0);
        a1 = _mm512_fmadd_ps(v0, _mm512_load_ps(x0 + 16), a1);
      }
      const float sc = p.scales[n];
      const float bi = p.bias ? p.bias[n] : 0.0f;
      alignas(64) float out[32];
      _mm512_store_ps(out, _mm512_add_ps(a0, c0));
      _mm512_store_ps(out + 16, _mm512_add_ps(a1, c1));
      for (int r = 0; r < 32; ++r) {
        const int64_t m = t * 32 + r;
        if (m >= p.M) break;
        p.y[m * p.N + n] = out[r] * sc + bi;
      }
    }
  }
}

static void sparse_xt(const SparseParams& p, int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
  g_sparse_dispatch(p, [&](auto vt, auto it) { sparse_xt_t<decltype(vt)::value, decltype(it)>(p, t0, t1, n0, n1); });
}

// ---------------------------------------------------------------- SparseConv
// Unit strides: the output plane (on the padded width, see g_sparse_conv_plane_t) in chunks of up
// to 16 registers; each chunk stays in registers over all the channel's nonzeros, so a nonzero costs
// R loads + R FMAs and no accumulator traffic.
template <ValType VT, class IT, int R>
static void conv_chunk(const SparseConvParams& p, int64_t co, int64_t start, int64_t len, float* acc) {
  const IT* idx = static_cast<const IT*>(p.w.indices);
  const __mmask16 last = tail16(len - 16 * (R - 1));
  __m512 a[R];  // unrolled loops keep a[] in registers (else GCC zeroes and copies it with rep stos/movs)
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  for (int64_t e = p.w.col_ptr[co]; e < p.w.col_ptr[co + 1]; ++e) {
    const __m512 v = _mm512_set1_ps(scalar_val<VT>(p.w.values, e));
    const float* src = p.xp + p.offset[idx[e]] + start;
#pragma GCC unroll 16
    for (int r = 0; r < R - 1; ++r) a[r] = _mm512_fmadd_ps(v, _mm512_loadu_ps(src + 16 * r), a[r]);
    a[R - 1] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(last, src + 16 * (R - 1)), a[R - 1]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R - 1; ++r) _mm512_storeu_ps(acc + start + 16 * r, a[r]);
  _mm512_mask_storeu_ps(acc + start + 16 * (R - 1), last, a[R - 1]);
}

template <ValType VT, class IT, int... R>
static void conv_chunk_any(const SparseConvParams& p, int64_t co, int64_t start, int64_t len, float* acc,
                           std::integer_sequence<int, R...>) {
  using Fn = void (*)(const SparseConvParams&, int64_t, int64_t, int64_t, float*);
  static constexpr Fn table[] = {conv_chunk<VT, IT, R + 1>...};
  table[(len + 15) / 16 - 1](p, co, start, len, acc);
}

static void sparse_conv_plane(const SparseConvParams& p, int64_t co, float* acc) {
  if (p.sh != 1 || p.sw != 1) return g_sparse_conv_plane(p, co, acc);
  g_sparse_dispatch(p.w, [&](auto vt, auto it) {
    constexpr ValType VT = decltype(vt)::value;
    using IT = decltype(it);
    const int64_t len = p.OH * p.Wp;
    for (int64_t start = 0; start < len; start += 256)
      conv_chunk_any<VT, IT>(p, co, start, std::min<int64_t>(256, len - start), acc, std::make_integer_sequence<int, 16>{});
  });
  if (p.ph > 0) return g_sparse_conv_output(p, co, acc, p.Wp);
  // y = acc * scale + bias (then ReLU) row by row in (masked) registers of 16
  const __m512 vs = _mm512_set1_ps(p.w.scales[co]), vb = _mm512_set1_ps(p.w.bias ? p.w.bias[co] : 0.0f);
  float* out = p.y;
  for (int64_t oh = 0; oh < p.OH; ++oh) {
    const float* a = acc + oh * p.Wp;
    float* o = out + oh * p.OW;
    for (int64_t ow = 0; ow < p.OW; ow += 16) {
      const __mmask16 m = tail16(p.OW - ow);
      const __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + ow), vs, vb);
      _mm512_mask_storeu_ps(o + ow, m, p.relu ? _mm512_max_ps(_mm512_setzero_ps(), v) : v);  // NaN stays NaN
    }
  }
}

// Each output register of a padded row is one masked load of the inputs it covers (lanes outside the
// input row are neither read nor kept: zeros) and one store: no per-row memset/memcpy calls, which
// cost ~1.5 us per image for a 16-channel 14x14 input (a tenth of the MNIST CNN's sparse model).
static void sparse_conv_pad(const float* s, int64_t H, int64_t W, int64_t pt, int64_t pl, int64_t Hp, int64_t Wp, float* d) {
  for (int64_t h = 0; h < Hp; ++h) {
    float* row = d + h * Wp;
    const int64_t sh = h - pt;
    const bool inside = sh >= 0 && sh < H;
    for (int64_t j = 0; j < Wp; j += 16) {
      const int64_t first = std::max<int64_t>(0, pl - j), end = std::min<int64_t>(16, pl + W - j);  // input lanes
      const __mmask16 in = inside && end > first ? (__mmask16)(tail16(end) & ~tail16(first)) : (__mmask16)0;
      const float* src = s + (inside ? sh * W : 0) + (j - pl);
      _mm512_mask_storeu_ps(row + j, tail16(Wp - j), _mm512_maskz_loadu_ps(in, src));
    }
  }
}

// ---------------------------------------------------------------- Quant
static void quant_x(const float* x, int64_t K, int64_t bs, int64_t nb, int8_t* xq, float* sx, int32_t* sumx) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * bs;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + bs; k += 16) {
      const __mmask16 mk = k < K ? tail16(K - k) : (__mmask16)0;
      const __m512 v = _mm512_maskz_loadu_ps(mk, x + (k < K ? k : 0));
      mx = _mm512_max_ps(mx, _mm512_and_ps(v, absmask));
    }
    const float amax = _mm512_reduce_max_ps(mx);
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m512 vinv = _mm512_set1_ps(inv);
    __m512i s = _mm512_setzero_si512();
    for (int64_t k = k0; k < k0 + bs; k += 16) {
      const __mmask16 mk = k < K ? tail16(K - k) : (__mmask16)0;
      const __m512 v = _mm512_maskz_loadu_ps(mk, x + (k < K ? k : 0));
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, vinv));  // round to nearest even
      q = _mm512_max_epi32(_mm512_set1_epi32(-127), _mm512_min_epi32(_mm512_set1_epi32(127), q));
      s = _mm512_add_epi32(s, q);
      _mm_storeu_si128((__m128i*)(xq + k), _mm512_cvtepi32_epi8(q));
    }
    sx[b] = amax / 127.0f;
    sumx[b] = _mm512_reduce_add_epi32(s);
  }
}

// RT rows x CB column blocks of 16; integer dot per K block with vpdpbusd (u8 weights x s8 acts).
// BS (block size) is a template parameter so the per-block loops unroll completely.
template <int RT, int CB, int BITS, int BS, bool F16S, bool ZP>
static inline void quant_tile(const QuantParams& p, int64_t m, int64_t cb) {
  constexpr int64_t bs = BS;
  const int64_t nb = p.nb;
  const int64_t bpb = bs * 2 * BITS;
  const int64_t KX = nb * bs;
  __m512 acc[RT][CB];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CB; ++c) acc[r][c] = _mm512_setzero_ps();
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  const int32_t zsym = 1 << (BITS - 1);
  for (int64_t b = 0; b < nb; ++b) {
    // symmetric: the zero point's share (-zp * sum xq) seeds the integer dot product
    __m512i d0[RT][CB], d1[RT][CB];
    for (int r = 0; r < RT; ++r) {
      const __m512i seed = ZP ? _mm512_setzero_si512() : _mm512_set1_epi32(-zsym * p.sumx[(m + r) * nb + b]);
      for (int c = 0; c < CB; ++c) {
        d0[r][c] = seed;
        d1[r][c] = _mm512_setzero_si512();
      }
    }
    const uint8_t* wb[CB];
    for (int c = 0; c < CB; ++c) wb[c] = p.w + ((cb + c) * nb + b) * bpb;
    if constexpr (RT == 1) {  // GEMV: stream the next tile's weights and scales into L2
      prefetch_l2(p.w + ((cb + CB) * nb) * bpb + b * CB * bpb, CB * bpb);
      const int64_t ssz = F16S ? 32 : 64;
      prefetch_l2(static_cast<const char*>(p.scales) + ((cb + CB) * nb) * ssz + b * CB * ssz, CB * ssz);
    }
    const int8_t* xb[RT];
    for (int r = 0; r < RT; ++r) xb[r] = p.xq + (m + r) * KX + b * bs;
    if constexpr (BITS == 4) {
      // high nibbles stay in place (16 x code, still a u8 operand); d1 is divided by 16 at the end
#pragma GCC unroll 16
      for (int64_t g = 0; g < bs / 8; ++g) {
        __m512i lo[CB], hi[CB];
        for (int c = 0; c < CB; ++c) {
          const __m512i raw = _mm512_loadu_si512(wb[c] + g * 64);
          lo[c] = _mm512_and_si512(raw, lo4);
          hi[c] = _mm512_andnot_si512(lo4, raw);
        }
        for (int r = 0; r < RT; ++r) {
          int32_t xl, xh;
          std::memcpy(&xl, xb[r] + 8 * g, 4);
          std::memcpy(&xh, xb[r] + 8 * g + 4, 4);
          const __m512i XL = _mm512_set1_epi32(xl), XH = _mm512_set1_epi32(xh);
          for (int c = 0; c < CB; ++c) {
            d0[r][c] = _mm512_dpbusd_epi32(d0[r][c], lo[c], XL);
            d1[r][c] = _mm512_dpbusd_epi32(d1[r][c], hi[c], XH);
          }
        }
      }
    } else {
#pragma GCC unroll 16
      for (int64_t g = 0; g < bs / 4; g += 2) {
        __m512i w0[CB], w1[CB];
        for (int c = 0; c < CB; ++c) {
          w0[c] = _mm512_loadu_si512(wb[c] + g * 64);
          w1[c] = _mm512_loadu_si512(wb[c] + g * 64 + 64);
        }
        for (int r = 0; r < RT; ++r) {
          int32_t x0, x1;
          std::memcpy(&x0, xb[r] + 4 * g, 4);
          std::memcpy(&x1, xb[r] + 4 * g + 4, 4);
          const __m512i X0 = _mm512_set1_epi32(x0), X1 = _mm512_set1_epi32(x1);
          for (int c = 0; c < CB; ++c) {
            d0[r][c] = _mm512_dpbusd_epi32(d0[r][c], w0[c], X0);
            d1[r][c] = _mm512_dpbusd_epi32(d1[r][c], w1[c], X1);
          }
        }
      }
    }
    for (int c = 0; c < CB; ++c) {
      const int64_t so = ((cb + c) * nb + b) * 16;
      __m512 sw;
      if constexpr (F16S)
        sw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(static_cast<const uint16_t*>(p.scales) + so)));
      else
        sw = _mm512_loadu_ps(static_cast<const float*>(p.scales) + so);
      __m512 zf;
      if constexpr (ZP) zf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p.zp + so))));
      for (int r = 0; r < RT; ++r) {
        const int64_t xo = (m + r) * nb + b;
        const __m512i hi = BITS == 4 ? _mm512_srai_epi32(d1[r][c], 4) : d1[r][c];  // exact: 16 | d1
        __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(d0[r][c], hi));
        if constexpr (ZP) f = _mm512_fnmadd_ps(zf, _mm512_set1_ps((float)p.sumx[xo]), f);
        acc[r][c] = _mm512_fmadd_ps(_mm512_mul_ps(f, sw), _mm512_set1_ps(p.sx[xo]), acc[r][c]);
      }
    }
  }
  for (int c = 0; c < CB; ++c) {
    const int64_t n0 = (cb + c) * 16;
    const __mmask16 mk = tail16(p.N - n0);
    const __m512 bi = p.bias ? _mm512_maskz_loadu_ps(mk, p.bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < RT; ++r) _mm512_mask_storeu_ps(p.y + (m + r) * p.N + n0, mk, _mm512_add_ps(acc[r][c], bi));
  }
}

template <int BITS, int BS, bool F16S, bool ZP>
static void quant_gemm_t(const QuantParams& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1) {
  // column chunks sized so the chunk's weights stay in L2 while all row tiles pass over it
  const int64_t bytes_per_cb = p.nb * p.bs * 2 * BITS;
  const int64_t chunk = std::max<int64_t>(2, (384 * 1024) / bytes_per_cb / 2 * 2);
  for (int64_t cc = c0; cc < c1; cc += chunk) {
    const int64_t ce = std::min(c1, cc + chunk);
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) {
      int64_t cb = cc;
      for (; cb + 2 <= ce; cb += 2) quant_tile<4, 2, BITS, BS, F16S, ZP>(p, m, cb);
      for (; cb < ce; ++cb) quant_tile<4, 1, BITS, BS, F16S, ZP>(p, m, cb);
    }
    for (; m < m1; ++m) {
      // one column block per tile: its weights and scales are two sequential streams, which
      // measured 0.31 vs 0.39 ms per cold 4096x4096 int4 GEMV against 4-block tiles (8 streams)
      for (int64_t cb = cc; cb < ce; ++cb) quant_tile<1, 1, BITS, BS, F16S, ZP>(p, m, cb);
    }
  }
}

static void quant_gemm(const QuantParams& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1) {
  quant_dispatch(p, [&](auto bits, auto bs, auto f16, auto zp) { quant_gemm_t<bits(), bs(), f16(), zp()>(p, m0, m1, c0, c1); });
}

}  // namespace isa_avx512

const KernelTable* GetKernelTableAvx512() {
  using namespace isa_avx512;
  // One panel step measured ~1.0 ns on Zen 4 (zmm vpermt2ps + FMA), L1- or L2-resident.
  constexpr float kPanelStepNs = 1.0f;
  // Sparse row path (M < 16): single rows through the x86 GEMV and the row walk of x86_helpers.inc,
  // tiles of 2-4 rows through the portable kernel; vgatherdps measured no faster (0.61 vs 0.55 ms at
  // 4096x4096, 90 % sparse).
  static const KernelTable t = {"avx512", kBinaryOpLayout, nullptr, binary_lut, binary_gemm, xnor_pack_x, xnor_gemm,
                                g_sparse_rows<SparseGemv>, sparse_xt, sparse_csr_acc, sparse_panel_input, sparse_panels, kPanelStepNs, sparse_conv_plane, sparse_conv_pad, quant_x, quant_gemm};
  return &t;
}
}  // namespace onnxopt
