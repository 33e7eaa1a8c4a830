// CUDA kernels of the ai.onnxopt ops and their launcher. Layouts: onnxopt/ops.py.
//
//  BinaryMatMul  warp lanes = 16 columns x 2 word rows; each 32-bit word turns into +-1.0f signs
//                (one LOP3 per bit, shared by the MR rows a thread carries) and FFMAs against X
//                staged in shared memory. The 8 warps of a block split K (GEMV) or columns (GEMM).
//  XnorMatMul    prologue binarizes X with warp ballots (bits + beta = mean|x| per row); the main
//                kernel is XOR + __popcll over 64-bit words, lanes = 8 columns x 4 word rows.
//  SparseMatMul  small M: one warp per output column, lanes stride the CSC entries and gather X.
//                larger M: X is transposed (K x M) into scratch (L2-resident); each warp walks the
//                CSC entries of 4 columns (broadcast by shuffles), lanes = rows, X^T rows read
//                coalesced from global memory.
//  QuantMatMul   prologue quantizes X to int8 per row and K block (as ops.reference does); the
//                main kernel unpacks int4/int8 codes in registers and accumulates with dp4a,
//                lanes = 4 columns x 8 K blocks, 16-byte weight loads, integer sums per block.
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "onnxopt_cuda.h"

namespace onnxopt::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t Align256(size_t n) { return (n + 255) & ~size_t(255); }

void CheckLaunch(const char* what) { CheckCuda(cudaGetLastError(), what); }

// Smallest supported row tile >= min(M, cap).
int RowTile(int64_t M, int cap) {
  int t = 1;
  while (t < cap && t < M) t *= 2;
  return t;
}

// ============================================================================== BinaryMatMul

template <int MR, int CPB>
__global__ void __launch_bounds__(kThreads) BinaryKernel(const float* __restrict__ x, const uint32_t* __restrict__ bits,
                                                         const float* __restrict__ alpha,
                                                         const float* __restrict__ bias, float* __restrict__ y,
                                                         int M, int K, int N, int KW, int NB) {
  constexpr int KS = kWarps / CPB;  // warps splitting K within one column block
  constexpr int CHUNK = 32;         // words of 32 K rows staged per round
  __shared__ __align__(16) float xs[MR][CHUNK * 32];
  __shared__ float part[kWarps][MR][16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int l = lane & 15, half = lane >> 4;
  const int cbl = warp % CPB, ks = warp / CPB;
  const int c = blockIdx.y * CPB + cbl;
  const int m0 = blockIdx.x * MR;
  const bool col_ok = c < NB;
  const uint32_t* wcol = bits + (size_t)(col_ok ? c : 0) * KW * 16 + l;
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.f;

  for (int w0 = 0; w0 < KW; w0 += CHUNK) {
    const int nw = min(CHUNK, KW - w0);
    __syncthreads();
    for (int i = threadIdx.x; i < MR * CHUNK * 32; i += kThreads) {
      const int r = i / (CHUNK * 32), kk = i % (CHUNK * 32);
      const int k = w0 * 32 + kk, m = m0 + r;
      xs[r][kk] = (m < M && k < K) ? __ldg(x + (size_t)m * K + k) : 0.f;  // padding K rows count 0
    }
    __syncthreads();
    if (col_ok) {
      for (int wl = ks * 2 + half; wl < nw; wl += KS * 2) {
        uint32_t t = ~__ldg(wcol + (size_t)(w0 + wl) * 16);  // top bit set = negative weight
#pragma unroll
        for (int q = 7; q >= 0; --q) {  // K rows 4q+3 .. 4q of this word, high bit first
          float4 xv[MR];
#pragma unroll
          for (int r = 0; r < MR; ++r) xv[r] = reinterpret_cast<const float4*>(&xs[r][wl * 32])[q];
          float s;
#define ONNXOPT_SIGN_STEP(comp)                                           \
  s = __int_as_float((t & 0x80000000u) | 0x3f800000u);                    \
  t <<= 1;                                                                \
  _Pragma("unroll") for (int r = 0; r < MR; ++r) acc[r] = fmaf(s, xv[r].comp, acc[r]);
          ONNXOPT_SIGN_STEP(w)
          ONNXOPT_SIGN_STEP(z)
          ONNXOPT_SIGN_STEP(y)
          ONNXOPT_SIGN_STEP(x)
#undef ONNXOPT_SIGN_STEP
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] += __shfl_xor_sync(kFull, acc[r], 16);
  if (half == 0)
#pragma unroll
    for (int r = 0; r < MR; ++r) part[warp][r][l] = acc[r];
  __syncthreads();
  for (int i = threadIdx.x; i < CPB * MR * 16; i += kThreads) {
    const int cb = i / (MR * 16), r = (i / 16) % MR, ll = i % 16;
    float s = 0.f;
    for (int k2 = 0; k2 < KS; ++k2) s += part[k2 * CPB + cb][r][ll];
    const int n = (blockIdx.y * CPB + cb) * 16 + ll, m = m0 + r;
    if (n < N && m < M) y[(size_t)m * N + n] = s * alpha[n] + (bias ? bias[n] : 0.f);
  }
}

template <int MR, int CPB>
void LaunchBinaryT(const Problem& p, float* y, cudaStream_t st) {
  const int K = (int)p.attrs.K, N = (int)p.attrs.N, KW = (int)CeilDiv(K, 32), NB = (int)CeilDiv(N, 16);
  const dim3 grid((unsigned)CeilDiv(p.M, MR), (unsigned)CeilDiv(NB, CPB));
  const Tensor* bias = &p.inputs[3];
  BinaryKernel<MR, CPB><<<grid, kThreads, 0, st>>>(
      static_cast<const float*>(p.inputs[0].data), static_cast<const uint32_t*>(p.inputs[1].data),
      static_cast<const float*>(p.inputs[2].data), bias->present ? static_cast<const float*>(bias->data) : nullptr,
      y, (int)p.M, K, N, KW, NB);
  CheckLaunch("BinaryMatMul launch");
}

template <int MR>
void LaunchBinaryCols(const Problem& p, float* y, cudaStream_t st, int cpb) {
  switch (cpb) {
    case 8: return LaunchBinaryT<MR, 8>(p, y, st);
    case 2: return LaunchBinaryT<MR, 2>(p, y, st);
    default: return LaunchBinaryT<MR, 1>(p, y, st);
  }
}

// Columns per block: split K across warps while there are few blocks, else one column block per warp.
int ColumnsPerBlock(int64_t row_tiles, int64_t col_blocks, int sms) {
  for (int cpb : {8, 2}) {
    if (row_tiles * CeilDiv(col_blocks, cpb) >= 2 * sms) return cpb;
  }
  return 1;
}

int SmCount() {
  int dev = 0, sms = 0;
  CheckCuda(cudaGetDevice(&dev), "cudaGetDevice");
  CheckCuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return sms;
}

void LaunchBinary(const Problem& p, float* y, cudaStream_t st) {
  const int mr = RowTile(p.M, 8);
  const int cpb = ColumnsPerBlock(CeilDiv(p.M, mr), CeilDiv(p.attrs.N, 16), SmCount());
  switch (mr) {
    case 1: return LaunchBinaryCols<1>(p, y, st, cpb);
    case 2: return LaunchBinaryCols<2>(p, y, st, cpb);
    case 4: return LaunchBinaryCols<4>(p, y, st, cpb);
    default: return LaunchBinaryCols<8>(p, y, st, cpb);
  }
}

// ============================================================================== XnorMatMul

// One block per row: sign bits (x >= 0 -> 1, padding 0) and beta = mean|x|.
__global__ void __launch_bounds__(kThreads) XnorPackX(const float* __restrict__ x, uint64_t* __restrict__ xbits,
                                                      float* __restrict__ beta, int K, int KW) {
  __shared__ float red[kWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float* xr = x + (size_t)blockIdx.x * K;
  float s = 0.f;
  for (int w = warp; w < KW; w += kWarps) {
    const int k0 = w * 64 + lane, k1 = k0 + 32;
    const float a = k0 < K ? __ldg(xr + k0) : -1.f;
    const float b = k1 < K ? __ldg(xr + k1) : -1.f;
    const unsigned lo = __ballot_sync(kFull, a >= 0.f), hi = __ballot_sync(kFull, b >= 0.f);
    s += (k0 < K ? fabsf(a) : 0.f) + (k1 < K ? fabsf(b) : 0.f);
    if (lane == 0) xbits[(size_t)blockIdx.x * KW + w] = lo | ((uint64_t)hi << 32);
  }
  for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
  if (lane == 0) red[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int i = 0; i < kWarps; ++i) t += red[i];
    beta[blockIdx.x] = t / (float)K;
  }
}

template <int MR, int CPB>
__global__ void __launch_bounds__(kThreads) XnorKernel(const uint64_t* __restrict__ xbits, const float* __restrict__ beta,
                                                       const uint64_t* __restrict__ bits,
                                                       const float* __restrict__ alpha,
                                                       const float* __restrict__ bias, float* __restrict__ y,
                                                       int M, int K, int N, int KW, int NB) {
  constexpr int KS = kWarps / CPB;
  __shared__ int part[kWarps][MR][8];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int l = lane & 7, ws = lane >> 3;
  const int cbl = warp % CPB, ks = warp / CPB;
  const int c = blockIdx.y * CPB + cbl;
  const int m0 = blockIdx.x * MR;
  int cnt[MR];
  const uint64_t* xr[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    cnt[r] = 0;
    xr[r] = xbits + (size_t)min(m0 + r, M - 1) * KW;  // rows past M are computed, never written
  }
  if (c < NB) {
    const uint64_t* wcol = bits + (size_t)c * KW * 8 + l;
#pragma unroll 2
    for (int w = ks * 4 + ws; w < KW; w += KS * 4) {
      const uint64_t wb = __ldg(wcol + (size_t)w * 8);
#pragma unroll
      for (int r = 0; r < MR; ++r) cnt[r] += __popcll(__ldg(xr[r] + w) ^ wb);
    }
  }
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    cnt[r] += __shfl_xor_sync(kFull, cnt[r], 8);
    cnt[r] += __shfl_xor_sync(kFull, cnt[r], 16);
  }
  if (ws == 0)
#pragma unroll
    for (int r = 0; r < MR; ++r) part[warp][r][l] = cnt[r];
  __syncthreads();
  for (int i = threadIdx.x; i < CPB * MR * 8; i += kThreads) {
    const int cb = i / (MR * 8), r = (i / 8) % MR, ll = i % 8;
    int s = 0;
    for (int k2 = 0; k2 < KS; ++k2) s += part[k2 * CPB + cb][r][ll];
    const int n = (blockIdx.y * CPB + cb) * 8 + ll, m = m0 + r;
    if (n < N && m < M) y[(size_t)m * N + n] = beta[m] * alpha[n] * (float)(K - 2 * s) + (bias ? bias[n] : 0.f);
  }
}

struct XnorScratch {
  uint64_t* xbits;
  float* beta;
};

XnorScratch XnorWorkspace(const Problem& p, void* ws) {
  const int64_t KW = CeilDiv(p.attrs.K, 64);
  auto* base = static_cast<char*>(ws);
  return {reinterpret_cast<uint64_t*>(base), reinterpret_cast<float*>(base + Align256(p.M * KW * 8))};
}

size_t XnorWorkspaceBytes(const Problem& p) {
  return Align256(p.M * CeilDiv(p.attrs.K, 64) * 8) + Align256(p.M * 4);
}

template <int MR, int CPB>
void LaunchXnorT(const Problem& p, const XnorScratch& s, float* y, cudaStream_t st) {
  const int K = (int)p.attrs.K, N = (int)p.attrs.N, KW = (int)CeilDiv(K, 64), NB = (int)CeilDiv(N, 8);
  const dim3 grid((unsigned)CeilDiv(p.M, MR), (unsigned)CeilDiv(NB, CPB));
  const Tensor* bias = &p.inputs[3];
  XnorKernel<MR, CPB><<<grid, kThreads, 0, st>>>(
      s.xbits, s.beta, static_cast<const uint64_t*>(p.inputs[1].data), static_cast<const float*>(p.inputs[2].data),
      bias->present ? static_cast<const float*>(bias->data) : nullptr, y, (int)p.M, K, N, KW, NB);
  CheckLaunch("XnorMatMul launch");
}

template <int MR>
void LaunchXnorCols(const Problem& p, const XnorScratch& s, float* y, cudaStream_t st, int cpb) {
  switch (cpb) {
    case 8: return LaunchXnorT<MR, 8>(p, s, y, st);
    case 2: return LaunchXnorT<MR, 2>(p, s, y, st);
    default: return LaunchXnorT<MR, 1>(p, s, y, st);
  }
}

void LaunchXnor(const Problem& p, float* y, void* ws, cudaStream_t st) {
  const XnorScratch s = XnorWorkspace(p, ws);
  const int K = (int)p.attrs.K, KW = (int)CeilDiv(K, 64);
  XnorPackX<<<(unsigned)p.M, kThreads, 0, st>>>(static_cast<const float*>(p.inputs[0].data), s.xbits, s.beta, K, KW);
  CheckLaunch("XnorMatMul binarize launch");
  const int mr = RowTile(p.M, 16);
  const int cpb = ColumnsPerBlock(CeilDiv(p.M, mr), CeilDiv(p.attrs.N, 8), SmCount());
  switch (mr) {
    case 1: return LaunchXnorCols<1>(p, s, y, st, cpb);
    case 2: return LaunchXnorCols<2>(p, s, y, st, cpb);
    case 4: return LaunchXnorCols<4>(p, s, y, st, cpb);
    case 8: return LaunchXnorCols<8>(p, s, y, st, cpb);
    default: return LaunchXnorCols<16>(p, s, y, st, cpb);
  }
}

// ============================================================================== SparseMatMul

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(int8_t v) { return (float)v; }

__device__ __forceinline__ int Clamp(int v, int lo, int hi) { return min(max(v, lo), hi); }

constexpr int kSparseRowPathMax = 8;

// Small M: one warp per output column; lanes stride the column's entries and gather X (L1).
template <int MR, typename V, typename IT>
__global__ void __launch_bounds__(kThreads) SparseRowsKernel(const float* __restrict__ x, const V* __restrict__ values,
                                                             const IT* __restrict__ indices,
                                                             const int* __restrict__ col_ptr,
                                                             const float* __restrict__ scales,
                                                             const float* __restrict__ bias, float* __restrict__ y,
                                                             int M, int K, int N, int nnz) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x * kWarps + warp;
  if (n >= N) return;
  const int m0 = blockIdx.y * MR;
  const float* xr[MR];
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    acc[r] = 0.f;
    xr[r] = x + (size_t)min(m0 + r, M - 1) * K;
  }
  const int start = Clamp(__ldg(col_ptr + n), 0, nnz);
  const int end = Clamp(__ldg(col_ptr + n + 1), start, nnz);
#pragma unroll 4
  for (int j = start + lane; j < end; j += 32) {
    const unsigned kk = __ldg(indices + j);
    if (kk < (unsigned)K) {  // malformed entries (rejected by CheckSparseStructure) never read out of bounds
      const float v = ToFloat(values[j]);
#pragma unroll
      for (int r = 0; r < MR; ++r) acc[r] = fmaf(v, __ldg(xr[r] + kk), acc[r]);
    }
  }
  const float sc = scales[n], bi = bias ? bias[n] : 0.f;
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    float a = acc[r];
    for (int o = 16; o; o >>= 1) a += __shfl_xor_sync(kFull, a, o);
    if (lane == r && m0 + r < M) y[(size_t)(m0 + r) * N + n] = a * sc + bi;
  }
}

// xt[k][m] = x[m][k] (zero for k >= K or m >= M), k < Kp, m < Mp.
__global__ void TransposeX(const float* __restrict__ x, float* __restrict__ xt, int M, int K, int Mp) {
  __shared__ float tile[32][33];
  const int k0 = blockIdx.x * 32, m0 = blockIdx.y * 32;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int m = m0 + i, k = k0 + threadIdx.x;
    tile[i][threadIdx.x] = (m < M && k < K) ? __ldg(x + (size_t)m * K + k) : 0.f;
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += blockDim.y)
    xt[(size_t)(k0 + i) * Mp + m0 + threadIdx.x] = tile[threadIdx.x][i];
}

template <int VW>
struct VecOf;
template <>
struct VecOf<1> {
  using T = float;
  static __device__ __forceinline__ float get(const float& v, int) { return v; }
};
template <>
struct VecOf<2> {
  using T = float2;
  static __device__ __forceinline__ float get(const float2& v, int i) { return i ? v.y : v.x; }
};
template <>
struct VecOf<4> {
  using T = float4;
  static __device__ __forceinline__ float get(const float4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
  }
};

constexpr int kColsPerWarp = 4;
constexpr int kColsPerBlock = kWarps * kColsPerWarp;

// Larger M: each warp walks the CSC entries of its columns (entries broadcast by shuffles);
// lanes = rows (VW consecutive rows per lane), X^T rows read from global memory (L2-resident).
template <int VW, typename V, typename IT>
__global__ void __launch_bounds__(kThreads) SparseColsKernel(const float* __restrict__ xt, const V* __restrict__ values,
                                                             const IT* __restrict__ indices,
                                                             const int* __restrict__ col_ptr,
                                                             const float* __restrict__ scales,
                                                             const float* __restrict__ bias, float* __restrict__ y,
                                                             int M, int K, int N, int nnz, int Mp) {
  using Vec = typename VecOf<VW>::T;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int mc = blockIdx.y;
  const Vec* xtv = reinterpret_cast<const Vec*>(xt) + mc * 32 + lane;
  const int row_vecs = Mp / VW;
#pragma unroll 1
  for (int ci = 0; ci < kColsPerWarp; ++ci) {
    const int n = blockIdx.x * kColsPerBlock + warp * kColsPerWarp + ci;
    if (n >= N) break;
    float acc[VW];
#pragma unroll
    for (int t = 0; t < VW; ++t) acc[t] = 0.f;
    const int start = Clamp(__ldg(col_ptr + n), 0, nnz);
    const int end = Clamp(__ldg(col_ptr + n + 1), start, nnz);
    for (int j0 = start; j0 < end; j0 += 32) {
      const int j = j0 + lane;
      unsigned kk = 0;
      float v = 0.f;
      if (j < end) {
        kk = __ldg(indices + j);
        v = ToFloat(values[j]);
        if (kk >= (unsigned)K) kk = 0, v = 0.f;  // malformed entry (rejected by CheckSparseStructure)
      }
      const int count = min(32, end - j0);
#pragma unroll 4
      for (int e = 0; e < count; ++e) {
        const int ke = __shfl_sync(kFull, (int)kk, e);
        const float ve = __shfl_sync(kFull, v, e);
        const Vec xv = __ldg(xtv + (size_t)ke * row_vecs);
#pragma unroll
        for (int t = 0; t < VW; ++t) acc[t] = fmaf(ve, VecOf<VW>::get(xv, t), acc[t]);
      }
    }
    const float sc = scales[n], bi = bias ? bias[n] : 0.f;
#pragma unroll
    for (int t = 0; t < VW; ++t) {
      const int m = (mc * 32 + lane) * VW + t;
      if (m < M) y[(size_t)m * N + n] = acc[t] * sc + bi;
    }
  }
}

struct SparseGeometry {
  int vw;       // rows per lane in the column path
  int64_t Mp;   // padded rows of xt
  int64_t Kp;   // K rounded up to the transpose tile (32)
};

SparseGeometry SparseGeom(const Problem& p) {
  const int vw = p.M <= 32 ? 1 : p.M <= 64 ? 2 : 4;
  return {vw, CeilDiv(p.M, 32 * vw) * 32 * vw, CeilDiv(p.attrs.K, 32) * 32};
}

size_t SparseWorkspaceBytes(const Problem& p) {
  if (p.M <= kSparseRowPathMax) return 0;
  const SparseGeometry g = SparseGeom(p);
  return Align256(g.Kp * g.Mp * sizeof(float));
}

template <typename V, typename IT>
void LaunchSparseT(const Problem& p, float* y, void* ws, cudaStream_t st) {
  const int K = (int)p.attrs.K, N = (int)p.attrs.N;
  const int nnz = (int)p.inputs[1].shape[0];
  const auto* x = static_cast<const float*>(p.inputs[0].data);
  const auto* values = static_cast<const V*>(p.inputs[1].data);
  const auto* indices = static_cast<const IT*>(p.inputs[2].data);
  const auto* cp = static_cast<const int*>(p.inputs[3].data);
  const auto* scales = static_cast<const float*>(p.inputs[4].data);
  const float* bias = p.inputs[5].present ? static_cast<const float*>(p.inputs[5].data) : nullptr;
  const int M = (int)p.M;
  if (p.M <= kSparseRowPathMax) {
    const int mr = RowTile(p.M, kSparseRowPathMax);
    const dim3 grid((unsigned)CeilDiv(N, kWarps), (unsigned)CeilDiv(p.M, mr));
#define ONNXOPT_ROWS(MR) \
  SparseRowsKernel<MR, V, IT><<<grid, kThreads, 0, st>>>(x, values, indices, cp, scales, bias, y, M, K, N, nnz)
    switch (mr) {
      case 1: ONNXOPT_ROWS(1); break;
      case 2: ONNXOPT_ROWS(2); break;
      case 4: ONNXOPT_ROWS(4); break;
      default: ONNXOPT_ROWS(8); break;
    }
#undef ONNXOPT_ROWS
    CheckLaunch("SparseMatMul launch");
    return;
  }
  const SparseGeometry g = SparseGeom(p);
  float* xt = static_cast<float*>(ws);
  TransposeX<<<dim3((unsigned)(g.Kp / 32), (unsigned)(g.Mp / 32)), dim3(32, 8), 0, st>>>(x, xt, M, K, (int)g.Mp);
  CheckLaunch("SparseMatMul transpose launch");
  const dim3 grid((unsigned)CeilDiv(N, kColsPerBlock), (unsigned)(g.Mp / (32 * g.vw)));
#define ONNXOPT_COLS(VW) \
  SparseColsKernel<VW, V, IT><<<grid, kThreads, 0, st>>>(xt, values, indices, cp, scales, bias, y, M, K, N, nnz, (int)g.Mp)
  switch (g.vw) {
    case 1: ONNXOPT_COLS(1); break;
    case 2: ONNXOPT_COLS(2); break;
    default: ONNXOPT_COLS(4); break;
  }
#undef ONNXOPT_COLS
  CheckLaunch("SparseMatMul launch");
}

template <typename V>
void LaunchSparseV(const Problem& p, float* y, void* ws, cudaStream_t st) {
  if (p.inputs[2].dtype == DType::U32) return LaunchSparseT<V, uint32_t>(p, y, ws, st);
  return LaunchSparseT<V, uint16_t>(p, y, ws, st);
}

void LaunchSparse(const Problem& p, float* y, void* ws, cudaStream_t st) {
  switch (p.inputs[1].dtype) {
    case DType::F16: return LaunchSparseV<__half>(p, y, ws, st);
    case DType::I8: return LaunchSparseV<int8_t>(p, y, ws, st);
    default: return LaunchSparseV<float>(p, y, ws, st);
  }
}

// Error codes of the structure check, written once (first failure wins). Thread n checks
// col_ptr[n] and the indices of column n; thread N checks col_ptr[N] == nnz.
template <typename IT>
__global__ void CheckSparseKernel(const int* __restrict__ cp, const IT* __restrict__ indices, int N, int K, int nnz,
                                  unsigned long long* __restrict__ err) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n > N) return;
  auto fail = [&](unsigned long long code, unsigned long long where) { atomicCAS(err, 0ULL, (code << 40) | where); };
  const int a = cp[n];
  if (n == 0 && a != 0) fail(1, 0);
  if (n == N) {
    if (a != nnz) fail(3, n);
    return;
  }
  const int e = cp[n + 1];
  if (e < a || a < 0 || e > nnz) {
    fail(2, n);
    return;
  }
  for (int j = a; j < e; ++j) {
    if (indices[j] >= (unsigned)K) {
      fail(4, j);
      return;
    }
  }
}

// ============================================================================== QuantMatMul

__device__ __forceinline__ int Dp4aUS(unsigned a, int b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// One warp per (row, K block): int8 codes rint(x * 127/max|x|), scale max|x|/127, code sum.
__global__ void __launch_bounds__(kThreads) QuantizeX(const float* __restrict__ x, int8_t* __restrict__ xq,
                                                      float* __restrict__ sx, int* __restrict__ sumx, int M, int K,
                                                      int bs, int nb) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = blockIdx.y * kWarps + warp, m = blockIdx.x;
  if (b >= nb) return;
  const float* xr = x + (size_t)m * K;
  float v[4];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int k = b * bs + i * 32 + lane;
    v[i] = (i * 32 < bs && k < K) ? __ldg(xr + k) : 0.f;
    amax = fmaxf(amax, fabsf(v[i]));
  }
  for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, o));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int sum = 0;
  int8_t* qr = xq + (size_t)m * nb * bs + (size_t)b * bs;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (i * 32 >= bs) break;
    const int q = (int)rintf(v[i] * inv);
    qr[i * 32 + lane] = (int8_t)q;
    sum += q;
  }
  for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(kFull, sum, o);
  if (lane == 0) {
    sx[(size_t)m * nb + b] = amax / 127.f;
    sumx[(size_t)m * nb + b] = sum;
  }
}

struct QuantScratch {
  int8_t* xq;
  float* sx;
  int* sumx;
};

QuantScratch QuantWorkspace(const Problem& p, void* ws) {
  const int64_t nb = CeilDiv(p.attrs.K, p.attrs.block_size);
  auto* base = static_cast<char*>(ws);
  const size_t a = Align256(p.M * nb * p.attrs.block_size), b = Align256(p.M * nb * 4);
  return {reinterpret_cast<int8_t*>(base), reinterpret_cast<float*>(base + a), reinterpret_cast<int*>(base + a + b)};
}

size_t QuantWorkspaceBytes(const Problem& p) {
  const int64_t nb = CeilDiv(p.attrs.K, p.attrs.block_size);
  return Align256(p.M * nb * p.attrs.block_size) + 2 * Align256(p.M * nb * 4);
}

// Lanes: q = lane & 3 owns columns 4q..4q+3 of the column block, lane >> 2 picks one of 8 K blocks;
// the 8 warps interleave over K blocks. A block's codes for 4 columns: BS/KG 16-byte loads.
template <int BITS, int BS, int MR>
__global__ void __launch_bounds__(kThreads) QuantKernel(const int8_t* __restrict__ xq, const float* __restrict__ sx,
                                                        const int* __restrict__ sumx, const uint8_t* __restrict__ w,
                                                        const void* __restrict__ scales_raw, bool scales_f16,
                                                        const uint8_t* __restrict__ zero_points,
                                                        const float* __restrict__ bias, float* __restrict__ y, int M,
                                                        int N, int nb) {
  constexpr int KG = 32 / BITS;           // K rows per 64-byte group
  constexpr int G = BS / KG;              // groups per K block
  constexpr int BB = BS * 2 * BITS;       // bytes per (column block, K block)
  constexpr int kSym = 1 << (BITS - 1);   // implicit zero point
  __shared__ float part[kWarps][MR][16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q = lane & 3, bl = lane >> 2;
  const int c = blockIdx.y, m0 = blockIdx.x * MR;
  const int Kp = nb * BS;
  int rows[MR];
  float acc[MR][4];
#pragma unroll
  for (int r = 0; r < MR; ++r) {
    rows[r] = min(m0 + r, M - 1);
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[r][i] = 0.f;
  }
  for (int b = warp * 8 + bl; b < nb; b += kWarps * 8) {
    const size_t cb = (size_t)c * nb + b;
    const uint4* wp = reinterpret_cast<const uint4*>(w + cb * BB) + q;
    int dot[MR][4];
#pragma unroll
    for (int r = 0; r < MR; ++r)
#pragma unroll
      for (int i = 0; i < 4; ++i) dot[r][i] = 0;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const uint4 wv = __ldg(wp + g * 4);
      const unsigned wd[4] = {wv.x, wv.y, wv.z, wv.w};
      if constexpr (BITS == 4) {
        unsigned lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          lo[i] = wd[i] & 0x0F0F0F0Fu;
          hi[i] = (wd[i] >> 4) & 0x0F0F0F0Fu;
        }
#pragma unroll
        for (int r = 0; r < MR; ++r) {
          const int2 xv = __ldg(reinterpret_cast<const int2*>(xq + (size_t)rows[r] * Kp + b * BS + g * 8));
#pragma unroll
          for (int i = 0; i < 4; ++i) dot[r][i] = Dp4aUS(hi[i], xv.y, Dp4aUS(lo[i], xv.x, dot[r][i]));
        }
      } else {
#pragma unroll
        for (int r = 0; r < MR; ++r) {
          const int xv = __ldg(reinterpret_cast<const int*>(xq + (size_t)rows[r] * Kp + b * BS + g * 4));
#pragma unroll
          for (int i = 0; i < 4; ++i) dot[r][i] = Dp4aUS(wd[i], xv, dot[r][i]);
        }
      }
    }
    float sc[4];
    if (scales_f16) {
      const uint2 h = __ldg(reinterpret_cast<const uint2*>(static_cast<const __half*>(scales_raw) + cb * 16 + 4 * q));
      const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&h.x));
      const float2 bb = __half22float2(*reinterpret_cast<const __half2*>(&h.y));
      sc[0] = a.x, sc[1] = a.y, sc[2] = bb.x, sc[3] = bb.y;
    } else {
      const float4 f = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(scales_raw) + cb * 16 + 4 * q));
      sc[0] = f.x, sc[1] = f.y, sc[2] = f.z, sc[3] = f.w;
    }
    int zp[4] = {kSym, kSym, kSym, kSym};
    if (zero_points) {
      const uchar4 z = __ldg(reinterpret_cast<const uchar4*>(zero_points + cb * 16 + 4 * q));
      zp[0] = z.x, zp[1] = z.y, zp[2] = z.z, zp[3] = z.w;
    }
#pragma unroll
    for (int r = 0; r < MR; ++r) {
      const float s = __ldg(sx + (size_t)rows[r] * nb + b);
      const int sum = __ldg(sumx + (size_t)rows[r] * nb + b);
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][i] = fmaf((float)(dot[r][i] - zp[i] * sum), s * sc[i], acc[r][i]);
    }
  }
#pragma unroll
  for (int r = 0; r < MR; ++r)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float a = acc[r][i];
      a += __shfl_xor_sync(kFull, a, 4);
      a += __shfl_xor_sync(kFull, a, 8);
      a += __shfl_xor_sync(kFull, a, 16);
      acc[r][i] = a;
    }
  if (bl == 0)
#pragma unroll
    for (int r = 0; r < MR; ++r)
#pragma unroll
      for (int i = 0; i < 4; ++i) part[warp][r][4 * q + i] = acc[r][i];
  __syncthreads();
  for (int i = threadIdx.x; i < MR * 16; i += kThreads) {
    const int r = i / 16, l = i % 16;
    float s = 0.f;
#pragma unroll
    for (int k2 = 0; k2 < kWarps; ++k2) s += part[k2][r][l];
    const int n = c * 16 + l, m = m0 + r;
    if (n < N && m < M) y[(size_t)m * N + n] = s + (bias ? bias[n] : 0.f);
  }
}

template <int BITS, int BS, int MR>
void LaunchQuantT(const Problem& p, const QuantScratch& s, float* y, cudaStream_t st) {
  const int N = (int)p.attrs.N, nb = (int)CeilDiv(p.attrs.K, BS), NB = (int)CeilDiv(N, 16);
  const dim3 grid((unsigned)CeilDiv(p.M, MR), (unsigned)NB);
  const Tensor &zp = p.inputs[3], &bias = p.inputs[4];
  QuantKernel<BITS, BS, MR><<<grid, kThreads, 0, st>>>(
      s.xq, s.sx, s.sumx, static_cast<const uint8_t*>(p.inputs[1].data), p.inputs[2].data,
      p.inputs[2].dtype == DType::F16, zp.present ? static_cast<const uint8_t*>(zp.data) : nullptr,
      bias.present ? static_cast<const float*>(bias.data) : nullptr, y, (int)p.M, N, nb);
  CheckLaunch("QuantMatMul launch");
}

template <int BITS, int BS>
void LaunchQuantRows(const Problem& p, const QuantScratch& s, float* y, cudaStream_t st) {
  switch (RowTile(p.M, 8)) {
    case 1: return LaunchQuantT<BITS, BS, 1>(p, s, y, st);
    case 2: return LaunchQuantT<BITS, BS, 2>(p, s, y, st);
    case 4: return LaunchQuantT<BITS, BS, 4>(p, s, y, st);
    default: return LaunchQuantT<BITS, BS, 8>(p, s, y, st);
  }
}

template <int BITS>
void LaunchQuantBits(const Problem& p, const QuantScratch& s, float* y, cudaStream_t st) {
  switch (p.attrs.block_size) {
    case 32: return LaunchQuantRows<BITS, 32>(p, s, y, st);
    case 64: return LaunchQuantRows<BITS, 64>(p, s, y, st);
    default: return LaunchQuantRows<BITS, 128>(p, s, y, st);
  }
}

void LaunchQuant(const Problem& p, float* y, void* ws, cudaStream_t st) {
  const QuantScratch s = QuantWorkspace(p, ws);
  const int K = (int)p.attrs.K, bs = (int)p.attrs.block_size, nb = (int)CeilDiv(K, bs);
  QuantizeX<<<dim3((unsigned)p.M, (unsigned)CeilDiv(nb, kWarps)), kThreads, 0, st>>>(
      static_cast<const float*>(p.inputs[0].data), s.xq, s.sx, s.sumx, (int)p.M, K, bs, nb);
  CheckLaunch("QuantMatMul quantize launch");
  if (p.attrs.bits == 4)
    LaunchQuantBits<4>(p, s, y, st);
  else
    LaunchQuantBits<8>(p, s, y, st);
}

}  // namespace

size_t WorkspaceBytes(const Problem& p) {
  if (p.M == 0) return 0;
  switch (p.op) {
    case Op::Xnor: return XnorWorkspaceBytes(p);
    case Op::Sparse: return SparseWorkspaceBytes(p);
    case Op::Quant: return QuantWorkspaceBytes(p);
    default: return 0;
  }
}

__global__ void __launch_bounds__(kThreads) ReluKernel(float* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < n; i += (int64_t)gridDim.x * kThreads)
    y[i] = y[i] < 0.0f ? 0.0f : y[i];  // NaN stays NaN, as on the CPU
}

void Launch(const Problem& p, float* y, void* workspace, cudaStream_t stream) {
  if (p.M == 0) return;
  if (WorkspaceBytes(p) && !workspace) throw Error(std::string(OpName(p.op)) + " (CUDA): missing workspace");
  switch (p.op) {
    case Op::Binary: LaunchBinary(p, y, stream); break;
    case Op::Xnor: LaunchXnor(p, y, workspace, stream); break;
    case Op::Sparse: LaunchSparse(p, y, workspace, stream); break;
    case Op::Quant: LaunchQuant(p, y, workspace, stream); break;
  }
  if (p.attrs.relu) {
    const int64_t n = p.M * p.attrs.N;
    ReluKernel<<<(unsigned)std::min<int64_t>(CeilDiv(n, kThreads), 4096), kThreads, 0, stream>>>(y, n);
    CheckLaunch("activation relu launch");
  }
}

void CheckSparseStructure(const Problem& p, cudaStream_t stream) {
  if (p.op != Op::Sparse) return;
  const int K = (int)p.attrs.K, N = (int)p.attrs.N;
  const int nnz = (int)p.inputs[1].shape[0];
  unsigned long long* err = nullptr;
  CheckCuda(cudaMallocAsync(reinterpret_cast<void**>(&err), sizeof(*err), stream), "SparseMatMul check alloc");
  unsigned long long host = 0;
  cudaError_t e = cudaMemsetAsync(err, 0, sizeof(host), stream);
  if (e == cudaSuccess) {
    const unsigned blocks = (unsigned)CeilDiv(N + 1, kThreads);
    const auto* cp = static_cast<const int*>(p.inputs[3].data);
    if (p.inputs[2].dtype == DType::U32)
      CheckSparseKernel<<<blocks, kThreads, 0, stream>>>(cp, static_cast<const uint32_t*>(p.inputs[2].data), N, K,
                                                         nnz, err);
    else
      CheckSparseKernel<<<blocks, kThreads, 0, stream>>>(cp, static_cast<const uint16_t*>(p.inputs[2].data), N, K,
                                                         nnz, err);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess) e = cudaMemcpyAsync(&host, err, sizeof(host), cudaMemcpyDeviceToHost, stream);
  cudaFreeAsync(err, stream);
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  CheckCuda(e, "SparseMatMul structure check");
  if (!host) return;
  const unsigned long long code = host >> 40, where = host & ((1ULL << 40) - 1);
  std::string msg = "SparseMatMul (CUDA): ";
  switch (code) {
    case 1: msg += "col_ptr[0] must be 0"; break;
    case 2: msg += "col_ptr must be non-decreasing within [0, nnz]; column " + std::to_string(where) + " is not"; break;
    case 3: msg += "col_ptr[-1] must equal nnz=" + std::to_string(nnz); break;
    default: msg += "indices[" + std::to_string(where) + "] is out of range (row >= K=" + std::to_string(K) + ")";
  }
  throw Error(msg);
}

}  // namespace onnxopt::cuda
