// onnxruntime custom ops of domain ai.onnxopt: validation, activation preparation, threading.
// The per-ISA math is in isa_*.cpp behind KernelTable (kernels.h).
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

#define ONNXOPT_EXPORT extern "C" __attribute__((visibility("default")))

namespace onnxopt {
namespace {

constexpr const char* kDomain = "ai.onnxopt";

struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... A>
[[noreturn]] void Fail(const char* op, const A&... a) {
  std::ostringstream os;
  os << "ai.onnxopt." << op << ": ";
  (os << ... << a);
  throw OpError(os.str());
}

std::string ShapeStr(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  if (s.size() == 1) os << ",";
  os << ")";
  return os.str();
}

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return "uint32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "uint64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    default: return "other";
  }
}

struct In {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  const void* data = nullptr;
  template <class T>
  const T* as() const { return static_cast<const T*>(data); }
};

In Describe(const Ort::ConstValue& val) {
  In v;
  if (!val || !val.IsTensor()) return v;
  auto info = val.GetTensorTypeAndShapeInfo();
  v.present = true;
  v.type = info.GetElementType();
  v.shape = info.GetShape();
  v.numel = (int64_t)info.GetElementCount();
  v.data = val.GetTensorRawData();
  if (v.numel > 0 && !v.data) v.present = false;
  return v;
}

In GetIn(const Ort::KernelContext& ctx, size_t i) { return i < ctx.GetInputCount() ? Describe(ctx.GetInput(i)) : In{}; }

void Expect(const char* op, const In& v, const char* name, ONNXTensorElementDataType t, const std::vector<int64_t>& shape) {
  if (!v.present) Fail(op, "input '", name, "' is required");
  if (v.type != t) Fail(op, "input '", name, "' must be ", TypeName(t), ", got ", TypeName(v.type));
  if (v.shape != shape)
    Fail(op, "input '", name, "' must have shape ", ShapeStr(shape), ", got ", ShapeStr(v.shape));
}

struct XInfo {
  int64_t M;
  std::vector<int64_t> out_shape;
  const float* x;
};

XInfo CheckX(const char* op, const In& x, int64_t K, int64_t N) {
  if (!x.present) Fail(op, "input 'X' is required");
  if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) Fail(op, "input 'X' must be float32, got ", TypeName(x.type));
  if (x.shape.empty()) Fail(op, "input 'X' must have rank >= 1");
  if (x.shape.back() != K)
    Fail(op, "input 'X' has shape ", ShapeStr(x.shape), ": last dimension must equal K=", K);
  XInfo r;
  r.M = 1;
  for (size_t i = 0; i + 1 < x.shape.size(); ++i) r.M *= x.shape[i];
  r.out_shape.assign(x.shape.begin(), x.shape.end() - 1);
  r.out_shape.push_back(N);
  r.x = x.as<float>();
  return r;
}

const float* CheckBias(const char* op, const In& b, int64_t N) {
  if (!b.present) return nullptr;
  Expect(op, b, "bias", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {N});
  return b.as<float>();
}

int64_t Ceil(int64_t a, int64_t b) { return (a + b - 1) / b; }

double ZeroFraction(const float* x, int64_t n) {
  int64_t zeros = 0;
  for (int64_t i0 = 0; i0 < n; i0 += 1 << 20) {  // 32-bit counts keep the inner loop vectorized
    int32_t z = 0;
    for (int64_t i = i0, i1 = std::min(n, i0 + (1 << 20)); i < i1; ++i) z += x[i] == 0.0f;
    zeros += z;
  }
  return n ? (double)zeros / (double)n : 0.0;
}

template <class F>
void Parallel(const Ort::KernelContext& ctx, int64_t n, F& f) {
  if (n <= 0) return;
  if (n == 1) {
    f((int64_t)0);
    return;
  }
  ctx.ParallelFor([](void* d, size_t i) { (*static_cast<F*>(d))((int64_t)i); }, (size_t)n, 0, &f);
}

// Splits [0, rows) x [0, cols) into tasks: columns first (weights shared per task), rows split
// only when there are too few column chunks.
struct Plan {
  int64_t rows, cols, rchunk, cchunk, nr, nc;
  int64_t tasks() const { return nr * nc; }
  void range(int64_t t, int64_t& r0, int64_t& r1, int64_t& c0, int64_t& c1) const {
    const int64_t ri = t / nc, ci = t % nc;
    r0 = ri * rchunk;
    r1 = std::min(rows, r0 + rchunk);
    c0 = ci * cchunk;
    c1 = std::min(cols, c0 + cchunk);
  }
};

Plan MakePlan(int64_t rows, int64_t cols, int64_t row_align, int64_t max_col_tasks = 32) {
  Plan p{rows, cols, rows, 1, 1, 1};
  p.nc = std::max<int64_t>(1, std::min(cols, max_col_tasks));
  p.cchunk = Ceil(cols, p.nc);
  p.nc = Ceil(cols, p.cchunk);
  if (p.nc < 8 && rows >= 2 * row_align) {
    const int64_t want = std::min<int64_t>(Ceil(16, p.nc), Ceil(rows, row_align));
    p.rchunk = Ceil(Ceil(rows, want), row_align) * row_align;
    p.nr = Ceil(rows, p.rchunk);
  }
  return p;
}

template <class T>
T* Buf(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// n floats starting at a 64-byte boundary inside v.
float* AlignedBuf(std::vector<float>& v, size_t n) {
  float* b = Buf(v, n + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(b) + 63) & ~uintptr_t(63));
}

thread_local std::vector<float> tls_f;
thread_local std::vector<uint64_t> tls_u64;
thread_local std::vector<uint32_t> tls_u32;
thread_local std::vector<int8_t> tls_i8;
thread_local std::vector<int32_t> tls_i32;

// ------------------------------------------------------------------ kernels

struct KernelBase {
  const KernelTable* tbl;
  int64_t K, N;
  std::vector<In> constants;  // per input: described once if it is a constant initializer, else not present
  KernelBase(const OrtKernelInfo* info, const char* op) {
    Ort::ConstKernelInfo ki(info);
    tbl = SelectKernelTable();
    K = GetInt(ki, op, "K", -1);
    N = GetInt(ki, op, "N", -1);
    if (K < 1 || N < 1) Fail(op, "attributes K and N are required and must be >= 1 (K=", K, ", N=", N, ")");
    constants.resize(ki.GetInputCount());
    for (size_t i = 0; i < constants.size(); ++i) {
      int is_const = 0;
      Ort::ConstValue v = ki.GetTensorConstantInput(i, &is_const);
      if (is_const) constants[i] = Describe(v);
    }
  }
  // Input i; a constant initializer's description is the one made at creation (GetIn costs ~0.3 us
  // of onnxruntime API calls per input, several us per call for a six-input op).
  In Input(const Ort::KernelContext& ctx, size_t i) const {
    return i < constants.size() && constants[i].present ? constants[i] : GetIn(ctx, i);
  }
  bool IsConstant(size_t i) const { return i < constants.size() && constants[i].present; }
  // A string attribute, `def` when absent; one of another type fails (the C++ API throws alike for both).
  static std::string GetString(const Ort::ConstKernelInfo& ki, const char* op, const char* name, const char* def) {
    try {
      return ki.GetAttribute<std::string>(name);
    } catch (const Ort::Exception&) {
    }
    int64_t i = 0;
    float f = 0.0f;
    for (OrtStatus* st : {Ort::GetApi().KernelInfoGetAttribute_int64(ki, name, &i), Ort::GetApi().KernelInfoGetAttribute_float(ki, name, &f)}) {
      if (!st) Fail(op, "attribute ", name, " must be a string");
      Ort::GetApi().ReleaseStatus(st);
    }
    return def;
  }
  static int64_t GetInt(const Ort::ConstKernelInfo& ki, const char* op, const char* name, int64_t def) {
    int64_t v = def;
    OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(ki, name, &v);
    if (st) {
      Ort::GetApi().ReleaseStatus(st);
      return def;
    }
    (void)op;
    return v;
  }
};

struct BinaryKernel : KernelBase {
  static constexpr const char* kName = "BinaryMatMul";
  // The table's copy of constant bits in its own layout (tables with binary_repack), built once.
  std::once_flag repack_once;
  std::vector<uint32_t> repacked;
  explicit BinaryKernel(const OrtKernelInfo* info) : KernelBase(info, kName) {}

  // bits in the table's layout: the input itself, the constant copy, or a per-call repack.
  const uint32_t* TableBits(const In& bits, int64_t KW, int64_t NB) {
    if (!tbl->binary_repack) return bits.as<uint32_t>();
    const size_t n = (size_t)(NB * KW * tbl->binary_layout.block);
    if (IsConstant(1)) {
      std::call_once(repack_once, [&] {
        repacked.resize(n);
        tbl->binary_repack(bits.as<uint32_t>(), K, N, repacked.data());
      });
      return repacked.data();
    }
    uint32_t* out = Buf(tls_u32, n);
    tbl->binary_repack(bits.as<uint32_t>(), K, N, out);
    return out;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    XInfo xi = CheckX(kName, GetIn(ctx, 0), K, N);
    In bits = Input(ctx, 1), alpha = Input(ctx, 2);
    constexpr BinaryLayout op = kBinaryOpLayout;
    Expect(kName, bits, "bits", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32, {Ceil(N, op.block), Ceil(K, op.per_word()), op.block});
    Expect(kName, alpha, "alpha", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {N});
    const float* bias = CheckBias(kName, Input(ctx, 3), N);
    auto out = ctx.GetOutput(0, xi.out_shape);
    float* y = out.GetTensorMutableData<float>();
    const int64_t M = xi.M;
    if (M == 0) return;
    const BinaryLayout& L = tbl->binary_layout;
    const int64_t KW = Ceil(K, L.per_word()), NB = Ceil(N, L.block), lut_row = KW * L.groups * L.entries();
    float* lut = Buf(tls_f, (size_t)(M * lut_row));
    auto prep = [&](int64_t i) {
      const int64_t r0 = i * 8, r1 = std::min(M, r0 + 8);
      for (int64_t m = r0; m < r1; ++m) tbl->binary_lut(xi.x + m * K, K, KW, lut + m * lut_row);
    };
    Parallel(ctx, Ceil(M, 8), prep);
    BinaryParams p{M, K, N, KW, NB, TableBits(bits, KW, NB), alpha.as<float>(), bias, lut, y};
    Plan plan = MakePlan(M, NB, 4);
    auto run = [&](int64_t t) {
      int64_t r0, r1, c0, c1;
      plan.range(t, r0, r1, c0, c1);
      if (r0 < r1 && c0 < c1) tbl->binary_gemm(p, r0, r1, c0, c1);
    };
    Parallel(ctx, plan.tasks(), run);
  }
};

struct XnorKernel : KernelBase {
  static constexpr const char* kName = "XnorMatMul";
  explicit XnorKernel(const OrtKernelInfo* info) : KernelBase(info, kName) {}
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const int64_t KW = Ceil(K, 64), NB = Ceil(N, 8);
    XInfo xi = CheckX(kName, GetIn(ctx, 0), K, N);
    In bits = Input(ctx, 1), alpha = Input(ctx, 2);
    Expect(kName, bits, "bits", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64, {NB, KW, 8});
    Expect(kName, alpha, "alpha", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {N});
    const float* bias = CheckBias(kName, Input(ctx, 3), N);
    auto out = ctx.GetOutput(0, xi.out_shape);
    float* y = out.GetTensorMutableData<float>();
    const int64_t M = xi.M;
    if (M == 0) return;
    uint64_t* xb = Buf(tls_u64, (size_t)(M * KW));
    float* beta = Buf(tls_f, (size_t)M);
    auto prep = [&](int64_t i) {
      const int64_t r0 = i * 16, r1 = std::min(M, r0 + 16);
      for (int64_t m = r0; m < r1; ++m) tbl->xnor_pack_x(xi.x + m * K, K, KW, xb + m * KW, beta + m);
    };
    Parallel(ctx, Ceil(M, 16), prep);
    XnorParams p{M, K, N, KW, NB, bits.as<uint64_t>(), alpha.as<float>(), bias, xb, beta, y};
    Plan plan = MakePlan(M, NB, 4);
    auto run = [&](int64_t t) {
      int64_t r0, r1, c0, c1;
      plan.range(t, r0, r1, c0, c1);
      if (r0 < r1 && c0 < c1) tbl->xnor_gemm(p, r0, r1, c0, c1);
    };
    Parallel(ctx, plan.tasks(), run);
  }
};

float ValueAt(ValType vt, const void* values, int64_t j) {
  switch (vt) {
    case ValType::F32: return static_cast<const float*>(values)[j];
    case ValType::F16: return HalfToFloat(static_cast<const uint16_t*>(values)[j]);
    default: return (float)static_cast<const int8_t*>(values)[j];
  }
}

// Row-major copy of a constant CSC weight, scales folded in, fp16 values kept as such when unscaled
// (SparseCsr views it).
struct CsrCopy {
  std::vector<int32_t> row_ptr;
  std::vector<uint16_t> cols16;
  std::vector<uint32_t> cols32;
  std::vector<float> values;
  bool half = false;              // values kept fp16 (float16 weights whose column scales are all 1)
  std::vector<uint16_t> halves;  // the fp16 values instead of values
  std::vector<int32_t> dense_rows, dense_before;
  std::vector<float> dense;
  std::vector<uint16_t> dense_halves;  // the dense rows' fp16 values instead, with the CSR's

  // Rows padded to whole steps of SparseCsr::kStep; rows at least SparseCsr::kDenseRow full kept dense
  // (see there).
  template <class IT>
  void Build(const SparseParams& p, int64_t nnz) {
    const IT* idx = static_cast<const IT*>(p.indices);
    std::vector<int32_t> count((size_t)p.K, 0);
    for (int64_t j = 0; j < nnz; ++j) ++count[idx[j]];
    const int64_t chunks = Ceil(p.N, SparseCsr::kChunk), row_floats = chunks * SparseCsr::kChunk;
    const bool wide = p.N > SparseCsr::kMaxOffsetN;
    half = p.vt == ValType::F16 && std::all_of(p.scales, p.scales + p.N, [](float s) { return s == 1.0f; });
    // Dense rows, densest first: rows at least kDenseRow full while the whole copy stays within
    // kDenseBytes; past that (a copy streamed from memory, where bytes are the cost) only rows whose
    // dense copy is no larger than their CSR entries.
    const int64_t entry_bytes = (wide ? 4 : 2) + (half ? 2 : 4), row_bytes = (half ? 2 : 4) * row_floats;
    std::vector<int32_t> by_count;
    for (int64_t k = 0; k < p.K; ++k)
      if (count[k] > 0 && count[k] >= SparseCsr::kDenseRow * (double)row_floats) by_count.push_back((int32_t)k);
    std::stable_sort(by_count.begin(), by_count.end(), [&](int32_t a, int32_t b) { return count[a] > count[b]; });
    int64_t copy_bytes = nnz * entry_bytes;
    for (const int32_t k : by_count) {
      const int64_t grows = row_bytes - count[k] * entry_bytes;
      if (grows > 0 && copy_bytes + grows > SparseCsr::kDenseBytes) break;  // later rows grow it more
      copy_bytes += grows;
      dense_rows.push_back(k);
    }
    std::sort(dense_rows.begin(), dense_rows.end());
    std::vector<int32_t> dense_of((size_t)p.K, -1);
    dense_before.assign((size_t)p.K + 1, 0);
    for (size_t d = 0; d < dense_rows.size(); ++d) {
      dense_of[dense_rows[d]] = (int32_t)d;
      count[dense_rows[d]] = 0;  // no CSR entries
      dense_before[dense_rows[d] + 1] = 1;
    }
    for (int64_t k = 0; k < p.K; ++k) dense_before[k + 1] += dense_before[k];
    const int64_t D = (int64_t)dense_rows.size();
    if (half) dense_halves.assign((size_t)(chunks * D * SparseCsr::kChunk), 0);
    else dense.assign((size_t)(chunks * D * SparseCsr::kChunk), 0.0f);
    row_ptr.assign((size_t)p.K + 1, 0);
    for (int64_t k = 0; k < p.K; ++k) row_ptr[k + 1] = row_ptr[k] + (int32_t)Ceil(count[k], SparseCsr::kStep) * SparseCsr::kStep;
    const size_t total = (size_t)row_ptr[p.K];
    if (wide) cols32.assign(total, (uint32_t)p.N);
    else cols16.assign(total, (uint16_t)(4 * p.N));
    if (half) halves.assign(total, 0);
    else values.assign(total, 0.0f);
    std::vector<int32_t> fill(row_ptr.begin(), row_ptr.end() - 1);
    for (int64_t n = 0; n < p.N; ++n)
      for (int64_t j = p.col_ptr[n]; j < p.col_ptr[n + 1]; ++j) {
        const int64_t d = dense_of[idx[j]];
        if (d >= 0) {
          const size_t at = (size_t)(((n / SparseCsr::kChunk) * D + d) * SparseCsr::kChunk + n % SparseCsr::kChunk);
          if (half) dense_halves[at] = static_cast<const uint16_t*>(p.values)[j];
          else dense[at] = ValueAt(p.vt, p.values, j) * p.scales[n];
          continue;
        }
        const int32_t at = fill[idx[j]]++;
        if (wide) cols32[at] = (uint32_t)n;
        else cols16[at] = (uint16_t)(4 * n);
        if (half) halves[at] = static_cast<const uint16_t*>(p.values)[j];
        else values[at] = ValueAt(p.vt, p.values, j) * p.scales[n];
      }
  }
  SparseCsr View(const SparseParams& p) const {
    const bool wide = p.N > SparseCsr::kMaxOffsetN;
    const int64_t D = (int64_t)dense_rows.size();
    const int64_t width = D ? std::max(p.N + 1, Ceil(p.N, SparseCsr::kChunk) * SparseCsr::kChunk) : p.N + 1;
    return {p.K, p.N, wide, half, row_ptr.data(), wide ? (const void*)cols32.data() : (const void*)cols16.data(),
            half ? (const void*)halves.data() : (const void*)values.data(), D, width, dense_rows.data(), dense_before.data(),
            half ? (const void*)dense_halves.data() : (const void*)dense.data()};
  }
};

// The panel layout (SparsePanels) of a constant CSC weight, scales folded in; left empty when it
// would take more than kMaxBytes (weights that large stream from DRAM, where the CSC's fewer bytes win).
struct PanelCopy {
  static constexpr int64_t kMaxBytes = 8 << 20;
  int64_t P = 0, G = 0;
  bool rows_in_order = false;  // row_of[i] = i
  std::vector<int32_t> row_of, col_of;
  std::vector<uint8_t> steps, rows;
  std::vector<int64_t> group_step;
  std::vector<float> values;

  bool empty() const { return group_step.empty(); }
  int64_t Steps() const { return group_step.empty() ? 0 : group_step.back(); }

  // Local search over the row order (panel positions): swap two rows of different panels when that
  // does not add steps (sum over groups of the larger per-lane count in each of the two panels).
  // Seeded, so a weight always gets the same layout. MNIST fc1 at 90 %: 8.95 k -> 7.64 k steps with
  // 30 swaps tried per row (45 ms, once per kernel; 100 per row: 150 ms for no faster a model), and
  // the CNN 35 -> 32 us end to end; work capped at ~2e8 lane updates.
  template <class IT>
  void Balance(const SparseParams& p, const IT* idx, std::vector<int32_t>& order) const {
    const int64_t slots = P * 32;
    if (P < 2 || p.K * G > (1 << 22)) return;  // bits: 2 B per (row, group), at most 8 MB
    std::vector<uint16_t> bits((size_t)(p.K * G), 0);  // bits[row*G + g]: lanes of group g with an entry in row
    for (int64_t g = 0; g < G; ++g)
      for (int i = 0; i < 16; ++i) {
        const int32_t n = col_of[16 * g + i];
        if (n >= 0)
          for (int64_t j = p.col_ptr[n]; j < p.col_ptr[n + 1]; ++j) bits[(size_t)(idx[j] * G + g)] |= (uint16_t)(1u << i);
      }
    std::vector<int32_t> at((size_t)slots, -1);  // row at each panel position, -1 past K
    std::copy(order.begin(), order.end(), at.begin());
    auto row_bits = [&](int32_t r, int64_t g) -> unsigned { return r < 0 ? 0u : bits[(size_t)(r * G + g)]; };
    std::vector<uint8_t> count((size_t)(P * G * 16), 0), top((size_t)(P * G), 0);  // per (panel, group): lanes, max
    for (int64_t s = 0; s < slots; ++s)
      for (int64_t g = 0; g < G; ++g)
        for (int i = 0; i < 16; ++i) count[(size_t)(((s / 32) * G + g) * 16 + i)] += (row_bits(at[s], g) >> i) & 1;
    for (int64_t q = 0; q < P * G; ++q) top[q] = *std::max_element(&count[q * 16], &count[q * 16] + 16);
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    const int64_t tries = std::min<int64_t>(30 * p.K, (int64_t)2e8 / (32 * G));
    for (int64_t t = 0; t < tries; ++t) {
      rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
      const int64_t a = (int64_t)(rng % (uint64_t)slots), b = (int64_t)((rng >> 32) % (uint64_t)slots);
      const int64_t pa = a / 32, pb = b / 32;
      if (pa == pb || at[a] < 0 || at[b] < 0) continue;  // positions past K stay last: no gap shifts rows
      auto swapped = [&](int64_t g, uint8_t* na, uint8_t* nb) {  // both panels' lane counts after the swap
        const unsigned ba = row_bits(at[a], g), bb = row_bits(at[b], g);
        const uint8_t *ca = &count[(size_t)((pa * G + g) * 16)], *cb = &count[(size_t)((pb * G + g) * 16)];
        for (int i = 0; i < 16; ++i) {
          na[i] = (uint8_t)(ca[i] - ((ba >> i) & 1) + ((bb >> i) & 1));
          nb[i] = (uint8_t)(cb[i] - ((bb >> i) & 1) + ((ba >> i) & 1));
        }
      };
      uint8_t na[16], nb[16];
      int64_t delta = 0;
      for (int64_t g = 0; g < G; ++g) {
        if (row_bits(at[a], g) == row_bits(at[b], g)) continue;
        swapped(g, na, nb);
        delta += *std::max_element(na, na + 16) + *std::max_element(nb, nb + 16) - top[pa * G + g] - top[pb * G + g];
      }
      if (delta > 0) continue;
      for (int64_t g = 0; g < G; ++g) {
        if (row_bits(at[a], g) == row_bits(at[b], g)) continue;
        swapped(g, na, nb);
        std::copy(na, na + 16, &count[(size_t)((pa * G + g) * 16)]);
        std::copy(nb, nb + 16, &count[(size_t)((pb * G + g) * 16)]);
        top[pa * G + g] = *std::max_element(na, na + 16), top[pb * G + g] = *std::max_element(nb, nb + 16);
      }
      std::swap(at[a], at[b]);
    }
    order.clear();
    for (int32_t r : at)
      if (r >= 0) order.push_back(r);
  }

  template <class IT>
  void Build(const SparseParams& p, int64_t nnz) {
    const IT* idx = static_cast<const IT*>(p.indices);
    const int32_t* cp = p.col_ptr;
    P = Ceil(p.K, 32), G = Ceil(p.N, 16);
    std::vector<int64_t> row_nnz((size_t)p.K, 0);
    for (int64_t j = 0; j < nnz; ++j) ++row_nnz[idx[j]];
    // densest columns first: groups of similar density need fewer padding lanes
    col_of.assign((size_t)(G * 16), -1);
    for (int64_t n = 0; n < p.N; ++n) col_of[n] = (int32_t)n;
    std::stable_sort(col_of.begin(), col_of.begin() + p.N,
                     [&](int32_t a, int32_t b) { return cp[a + 1] - cp[a] > cp[b + 1] - cp[b]; });
    std::vector<int32_t> pos((size_t)p.K);  // panel position of each row of W
    // count[p*16 + lane]: entries of a lane's column in panel p (at most 32)
    std::vector<uint8_t> count((size_t)(P * 16));
    auto for_lanes = [&](int64_t g, auto&& f) {  // f(lane, panel, row in panel, entry, column)
      std::fill(count.begin(), count.end(), 0);
      for (int i = 0; i < 16; ++i) {
        const int32_t n = col_of[16 * g + i];
        if (n < 0) continue;
        for (int64_t j = cp[n]; j < cp[n + 1]; ++j) {
          const int32_t q = pos[idx[j]];
          f(i, q / 32, q % 32, j, n);
        }
      }
    };
    auto lay_out = [&](const std::vector<int32_t>& order) {  // rows in this order; the steps it takes
      row_of.assign((size_t)(P * 32), -1);
      for (int64_t i = 0; i < p.K; ++i) row_of[i] = order[i], pos[order[i]] = (int32_t)i;
      steps.assign((size_t)(G * P), 0);
      group_step.assign((size_t)G + 1, 0);
      for (int64_t g = 0; g < G; ++g) {
        for_lanes(g, [&](int i, int32_t pan, int32_t, int64_t, int32_t) { ++count[pan * 16 + i]; });
        int64_t total = 0;
        for (int64_t pan = 0; pan < P; ++pan) {
          const uint8_t* c = &count[pan * 16];
          steps[g * P + pan] = *std::max_element(c, c + 16);
          total += steps[g * P + pan];
        }
        group_step[g + 1] = group_step[g] + total;
      }
      return Steps();
    };
    if (nnz * 5 > kMaxBytes) return;  // steps >= nnz/16 at 80 B each: over the cap whatever the layout
    // Rows in their own order (N:M patterns fill every lane of every step there) or densest first
    // (unstructured: panels of similar density need fewer padding lanes) then balanced between
    // panels, whichever takes fewer steps.
    std::vector<int32_t> own((size_t)p.K), balanced;
    for (int64_t k = 0; k < p.K; ++k) own[k] = (int32_t)k;
    balanced = own;
    std::stable_sort(balanced.begin(), balanced.end(), [&](int32_t a, int32_t b) { return row_nnz[a] > row_nnz[b]; });
    Balance(p, idx, balanced);
    rows_in_order = lay_out(own) < lay_out(balanced);
    if (rows_in_order) lay_out(own);
    if (Steps() * 16 * 5 > kMaxBytes) {
      group_step.clear();
      return;
    }
    rows.assign((size_t)(Steps() * 16), 0);
    values.assign((size_t)(Steps() * 16), 0.0f);
    std::vector<int64_t> first((size_t)P);  // first step of each segment of the group
    for (int64_t g = 0; g < G; ++g) {
      first[0] = group_step[g];
      for (int64_t pan = 1; pan < P; ++pan) first[pan] = first[pan - 1] + steps[g * P + pan - 1];
      for_lanes(g, [&](int i, int32_t pan, int32_t r, int64_t j, int32_t n) {
        const int64_t at = 16 * (first[pan] + count[pan * 16 + i]++) + i;
        rows[at] = (uint8_t)r;
        values[at] = ValueAt(p.vt, p.values, j) * p.scales[n];
      });
    }
  }
  SparsePanels View() const {
    return {P, G, rows_in_order, row_of.data(), col_of.data(), steps.data(), group_step.data(), rows.data(), values.data()};
  }
};

// The weight inputs shared by SparseMatMul and SparseConv: values, indices, col_ptr, scales[, bias]
// (inputs 1-5). Constant (initializer) indices/col_ptr are validated once, on the first call that
// sees them.
struct SparseBase : KernelBase {
  const char* op;
  bool relu = false;  // attribute activation: "none" (default) or "relu", applied to Y
  std::atomic<bool> const_checked{false};
  // Weights whose inputs 1-5 are all constant (or bias absent): validated on the first call, then
  // reused (describing and checking six inputs cost ~1 us per call).
  std::mutex cached_mu;
  std::atomic<bool> cached_ready{false};
  SparseParams cached{};
  int64_t cached_nnz = 0;
  SparseBase(const OrtKernelInfo* info, const char* name) : KernelBase(info, name), op(name) {
    const std::string activation = GetString(Ort::ConstKernelInfo(info), op, "activation", "none");
    if (activation != "none" && activation != "relu") Fail(op, "attribute activation must be \"none\" or \"relu\", got \"", activation, "\"");
    relu = activation == "relu";
  }

  // col_ptr: 0 = cp[0] <= cp[1] <= ... <= cp[N] = nnz; every index < K.
  template <class IT>
  void CheckStructure(const int32_t* cp, const IT* idx, int64_t nnz) const {
    if (cp[0] != 0) Fail(op, "col_ptr[0] must be 0, got ", cp[0]);
    if (cp[N] != nnz) Fail(op, "col_ptr[-1]=", cp[N], " must equal the number of values (", nnz, ")");
    for (int64_t n = 0; n < N; ++n)
      if (cp[n + 1] < cp[n] || cp[n + 1] > nnz)
        Fail(op, "col_ptr is not a valid column table: col_ptr[", n + 1, "]=", cp[n + 1], " after col_ptr[", n,
             "]=", cp[n], " (must be non-decreasing and <= nnz=", nnz, ")");
    IT mx = 0;
    for (int64_t j = 0; j < nnz; ++j) mx = std::max(mx, idx[j]);
    if (nnz > 0 && (int64_t)mx >= K) {
      int64_t j = 0;
      while ((int64_t)idx[j] < K) ++j;
      const int64_t n = std::upper_bound(cp, cp + N + 1, (int32_t)j) - cp - 1;
      Fail(op, "indices[", j, "]=", (int64_t)idx[j], " (column ", n, ") is out of range: row must be < K=", K);
    }
  }

  // Validates the weight inputs; fills every weight field of the returned params (M, x, y: caller).
  SparseParams Weights(const Ort::KernelContext& ctx, int64_t& nnz, bool& all_constant) {
    if (cached_ready.load(std::memory_order_acquire)) {
      nnz = cached_nnz;
      all_constant = true;
      return cached;
    }
    In values = Input(ctx, 1), indices = Input(ctx, 2), cptr = Input(ctx, 3), scales = Input(ctx, 4);
    if (!values.present) Fail(op, "input 'values' is required");
    ValType vt;
    switch (values.type) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: vt = ValType::F32; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: vt = ValType::F16; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: vt = ValType::I8; break;
      default: Fail(op, "input 'values' must be float32, float16 or int8, got ", TypeName(values.type));
    }
    if (values.shape.size() != 1) Fail(op, "input 'values' must be 1-D, got shape ", ShapeStr(values.shape));
    nnz = values.numel;
    if (!indices.present) Fail(op, "input 'indices' is required");
    if (indices.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16 && indices.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32)
      Fail(op, "input 'indices' must be uint16 or uint32, got ", TypeName(indices.type));
    const bool idx32 = indices.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32;
    Expect(op, indices, "indices", indices.type, {nnz});
    Expect(op, cptr, "col_ptr", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {N + 1});
    Expect(op, scales, "scales", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {N});
    const In bias_in = Input(ctx, 5);
    const float* bias = CheckBias(op, bias_in, N);
    const int32_t* cp = cptr.as<int32_t>();
    const bool constant = IsConstant(2) && IsConstant(3);
    all_constant = constant && IsConstant(1) && IsConstant(4);
    if (!constant || !const_checked.load(std::memory_order_acquire)) {
      if (idx32) CheckStructure(cp, indices.as<uint32_t>(), nnz);
      else CheckStructure(cp, indices.as<uint16_t>(), nnz);
      if (constant) const_checked.store(true, std::memory_order_release);
    }
    const SparseParams w{0, K, N, vt, idx32, values.data, indices.data, cp, scales.as<float>(), bias, nullptr, nullptr, nullptr};
    if (all_constant && (IsConstant(5) || !bias_in.present)) {
      std::lock_guard<std::mutex> lk(cached_mu);
      if (!cached_ready.load(std::memory_order_relaxed)) {  // once: readers may already be using it
        cached = w;
        cached_nnz = nnz;
        cached_ready.store(true, std::memory_order_release);
      }
    }
    return w;
  }
};

struct SparseKernel : SparseBase {
  static constexpr const char* kName = "SparseMatMul";
  // Small-M paths (M < 16) and their costs in ns, measured at 1568x512, 90 %, batch 1 on Zen 4
  // (bench/sparse_gemv.py): the column path 0.35 per entry and row; the row walk 0.6 per visited entry
  // (rows with x != 0), taken over the column path when at least kRowWalkMinZeros of X are exact
  // zeros; a panel step costs what the table says (the panel GEMV exists where it is > 0).
  static constexpr double kColumnNs = 0.35, kWalkNs = 0.6, kRowWalkMinZeros = 0.25;
  enum class Path { Auto, Columns, Walk, Panels };
  // ONNXOPT_SPARSE_PATH=columns|walk|panels forces a small-M path for constant weights (tests, A/B).
  const Path forced;
  // Copies of constant weights, each built on the first small-M call that needs it.
  std::mutex copy_mu;
  std::atomic<bool> csr_ready{false}, panels_ready{false};
  CsrCopy csr;
  PanelCopy panels;
  explicit SparseKernel(const OrtKernelInfo* info) : SparseBase(info, kName), forced(ForcedPath()) {}

  static Path ForcedPath() {
    const char* env = std::getenv("ONNXOPT_SPARSE_PATH");
    const std::string v = env ? env : "";
    if (v.empty() || v == "auto") return Path::Auto;
    if (v == "columns") return Path::Columns;
    if (v == "walk") return Path::Walk;
    if (v == "panels") return Path::Panels;
    Fail(kName, "ONNXOPT_SPARSE_PATH=", v, " is not one of auto, columns, walk, panels");
  }

  template <class Copy>
  const Copy& Built(std::atomic<bool>& ready, Copy& copy, const SparseParams& p, int64_t nnz) {
    if (!ready.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> lk(copy_mu);
      if (!ready.load(std::memory_order_relaxed)) {
        if (p.idx32) copy.template Build<uint32_t>(p, nnz);
        else copy.template Build<uint16_t>(p, nnz);
        ready.store(true, std::memory_order_release);
      }
    }
    return copy;
  }

  Path Choose(const SparseParams& p, int64_t nnz, bool constant) {
    if (!constant) return Path::Columns;
    if (forced == Path::Panels) return Built(panels_ready, panels, p, nnz).empty() ? Path::Columns : Path::Panels;
    if (forced != Path::Auto) return forced;
    const double zeros = ZeroFraction(p.x, p.M * p.K);
    Path path = zeros >= kRowWalkMinZeros ? Path::Walk : Path::Columns;
    const double cost = (path == Path::Walk ? kWalkNs * (1.0 - zeros) : kColumnNs) * (double)(nnz * p.M);
    if (tbl->sparse_panel_step_ns > 0) {
      const PanelCopy& pc = Built(panels_ready, panels, p, nnz);
      if (!pc.empty() && tbl->sparse_panel_step_ns * (double)(pc.Steps() * p.M) < cost) path = Path::Panels;
    }
    return path;
  }

  // y = X W by rows of W, skipping zero inputs; K split into up to 4 tasks with private sums of
  // w.width floats (N + 1: the last one the padding's sink; whole chunks with dense rows).
  void RowWalk(const Ort::KernelContext& ctx, const SparseParams& p, const SparseCsr& w) {
    const int64_t M = p.M, K = p.K, N = p.N, ld = w.width;
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(4, K / 256));
    const int64_t chunk = Ceil(K, tasks);
    float* acc = Buf(tls_f, (size_t)(tasks * M * ld));
    std::fill(acc, acc + tasks * M * ld, 0.0f);
    auto run = [&](int64_t t) {
      const int64_t k0 = t * chunk, k1 = std::min(K, k0 + chunk);
      for (int64_t m = 0; m < M && k0 < k1; ++m) tbl->sparse_csr_acc(w, p.x + m * K, k0, k1, acc + (t * M + m) * ld);
    };
    Parallel(ctx, tasks, run);
    for (int64_t m = 0; m < M; ++m) {  // y = bias + sum over tasks, row by row (vectorized)
      float* ym = p.y + m * N;
      if (p.bias) std::copy(p.bias, p.bias + N, ym);
      else std::fill(ym, ym + N, 0.0f);
      for (int64_t t = 0; t < tasks; ++t) {
        const float* a = acc + (t * M + m) * ld;
        for (int64_t n = 0; n < N; ++n) ym[n] += a[n];
      }
    }
  }

  // y = X W one row at a time over the panel layout; tasks are (row, chunk of column groups).
  void PanelGemv(const Ort::KernelContext& ctx, const SparseParams& p, const SparsePanels& w) {
    const int64_t M = p.M, K = p.K, span = w.P * 32;
    float* xp = AlignedBuf(tls_f, (size_t)(M * span));
    for (int64_t m = 0; m < M; ++m) {
      tbl->sparse_panel_input(w, p.x + m * K, K, xp + m * span);
    }
    const int64_t chunks = std::min<int64_t>(w.G, 8), per = Ceil(w.G, chunks);
    auto run = [&](int64_t t) {
      const int64_t m = t / chunks, g0 = (t % chunks) * per, g1 = std::min(w.G, g0 + per);
      if (g0 < g1) tbl->sparse_panels(w, xp + m * span, p.bias, g0, g1, p.y + m * p.N);
    };
    Parallel(ctx, M * chunks, run);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    XInfo xi = CheckX(kName, GetIn(ctx, 0), K, N);
    int64_t nnz;
    bool all_constant;
    SparseParams p = Weights(ctx, nnz, all_constant);
    auto out = ctx.GetOutput(0, xi.out_shape);
    float* y = out.GetTensorMutableData<float>();
    const int64_t M = xi.M;
    if (M == 0) return;
    p.M = M;
    p.x = xi.x;
    p.y = y;
    const Path path = M < 16 ? Choose(p, nnz, all_constant) : Path::Auto;
    if (path == Path::Walk) {
      RowWalk(ctx, p, Built(csr_ready, csr, p, nnz).View(p));
    } else if (path == Path::Panels) {
      PanelGemv(ctx, p, panels.View());
    } else if (M < 16) {
      const int64_t ncols = std::max<int64_t>(1, std::min<int64_t>(N, 32));
      const int64_t chunk = Ceil(N, ncols);
      auto run = [&](int64_t t) {
        const int64_t n0 = t * chunk, n1 = std::min(N, n0 + chunk);
        if (n0 < n1) tbl->sparse_rows(p, 0, M, n0, n1);
      };
      Parallel(ctx, Ceil(N, chunk), run);
    } else {
      const int64_t T = Ceil(M, 32);  // groups of 32 rows, layout [T][K][32]
      float* xt = AlignedBuf(tls_f, (size_t)(T * K * 32));
      auto tr = [&](int64_t i) {  // one (group, 64 K rows) tile per task
        const int64_t t = i % T, k0 = (i / T) * 64, k1 = std::min(K, k0 + 64);
        float* d = xt + (t * K + k0) * 32;
        for (int64_t r = 0; r < 32; ++r) {
          const int64_t m = t * 32 + r;
          if (m < M) {
            const float* xr = xi.x + m * K;
            for (int64_t k = k0; k < k1; ++k) d[(k - k0) * 32 + r] = xr[k];
          } else {
            for (int64_t k = k0; k < k1; ++k) d[(k - k0) * 32 + r] = 0.0f;
          }
        }
      };
      Parallel(ctx, T * Ceil(K, 64), tr);
      p.xt = xt;
      // tasks ordered group-major, so consecutive tasks reuse one group's X^T (K*128 bytes) from L2
      const int64_t ncols = std::max<int64_t>(1, std::min<int64_t>(N, 32));
      const int64_t chunk = Ceil(N, ncols), nchunks = Ceil(N, chunk);
      auto run = [&](int64_t i) {
        const int64_t t = i / nchunks, n0 = (i % nchunks) * chunk, n1 = std::min(N, n0 + chunk);
        if (n0 < n1) tbl->sparse_xt(p, t, t + 1, n0, n1);
      };
      Parallel(ctx, T * nchunks, run);
    }
    if (relu) {  // the output of every path is in cache at batch 1; larger ones in parallel slices
      const int64_t total = M * N, slice = 1 << 16;
      auto clamp = [&](int64_t t) {
        for (float *v = y + t * slice, *end = y + std::min(total, (t + 1) * slice); v < end; ++v) *v = *v < 0.0f ? 0.0f : *v;
      };
      Parallel(ctx, Ceil(total, slice), clamp);
    }
  }
};

thread_local std::vector<float> tls_plane;

struct SparseConvKernel : SparseBase {
  static constexpr const char* kName = "SparseConv";
  int64_t kh, kw, sh = 1, sw = 1, dh = 1, dw = 1, pt = 0, pl = 0, pb = 0, pr = 0;
  int64_t ph = 0, pw = 0, psh = 1, psw = 1;  // a following MaxPool folded into the op (ph = 0: none)
  explicit SparseConvKernel(const OrtKernelInfo* info) : SparseBase(info, kName) {
    Ort::ConstKernelInfo ki(info);
    const auto kernel = Ints(ki, "kernel_shape", {});
    const auto strides = Ints(ki, "strides", {1, 1}), dil = Ints(ki, "dilations", {1, 1});
    const auto pads = Ints(ki, "pads", {0, 0, 0, 0});
    if (kernel.size() != 2 || strides.size() != 2 || dil.size() != 2 || pads.size() != 4)
      Fail(kName, "attributes kernel_shape (2), strides (2), dilations (2) and pads (4) must describe a 2-D conv");
    kh = kernel[0], kw = kernel[1], sh = strides[0], sw = strides[1], dh = dil[0], dw = dil[1];
    pt = pads[0], pl = pads[1], pb = pads[2], pr = pads[3];
    if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || std::min({pt, pl, pb, pr}) < 0)
      Fail(kName, "kernel_shape, strides and dilations must be >= 1 and pads >= 0");
    if (K % (kh * kw) != 0) Fail(kName, "attribute K=", K, " is not channels x kernel_shape (", kh, "x", kw, ")");
    const auto pool = Ints(ki, "maxpool_kernel_shape", {});
    const auto pool_strides = Ints(ki, "maxpool_strides", {1, 1});
    if (!pool.empty()) {
      if (pool.size() != 2 || pool_strides.size() != 2 || std::min({pool[0], pool[1], pool_strides[0], pool_strides[1]}) < 1)
        Fail(kName, "attributes maxpool_kernel_shape and maxpool_strides must be 2 values >= 1");
      ph = pool[0], pw = pool[1], psh = pool_strides[0], psw = pool_strides[1];
    }
  }
  static std::vector<int64_t> Ints(const Ort::ConstKernelInfo& ki, const char* name, std::vector<int64_t> def) {
    try {
      return ki.GetAttributes<int64_t>(name);
    } catch (const Ort::Exception&) {
      return def;
    }
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const In x = GetIn(ctx, 0);
    if (!x.present) Fail(kName, "input 'X' is required");
    if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) Fail(kName, "input 'X' must be float32, got ", TypeName(x.type));
    const int64_t C = K / (kh * kw);
    if (x.shape.size() != 4 || x.shape[1] != C)
      Fail(kName, "input 'X' has shape ", ShapeStr(x.shape), ": expected (batch, ", C, ", H, W)");
    int64_t nnz;
    bool all_constant;
    SparseConvParams p{Weights(ctx, nnz, all_constant), C, kh, kw, sh, sw, dh, dw};
    p.relu = relu;
    const int64_t B = x.shape[0], H = x.shape[2], W = x.shape[3];
    p.Hp = H + pt + pb, p.Wp = W + pl + pr;
    p.OH = p.Hp < dh * (kh - 1) + 1 ? 0 : (p.Hp - dh * (kh - 1) - 1) / sh + 1;
    p.OW = p.Wp < dw * (kw - 1) + 1 ? 0 : (p.Wp - dw * (kw - 1) - 1) / sw + 1;
    if (p.OH < 1 || p.OW < 1)
      Fail(kName, "input 'X' of shape ", ShapeStr(x.shape), " is smaller than the dilated kernel");
    if (C * p.Hp * p.Wp + kw * dw >= INT32_MAX) Fail(kName, "input 'X' of shape ", ShapeStr(x.shape), " is too large");
    int64_t YH = p.OH, YW = p.OW;
    if (ph > 0) {
      if (p.OH < ph || p.OW < pw)
        Fail(kName, "input 'X' of shape ", ShapeStr(x.shape), ": the conv output ", p.OH, "x", p.OW,
             " is smaller than maxpool_kernel_shape");
      YH = (p.OH - ph) / psh + 1, YW = (p.OW - pw) / psw + 1;
      p.ph = ph, p.pw = pw, p.psh = psh, p.psw = psw, p.PH = YH, p.PW = YW;
    }
    auto out = ctx.GetOutput(0, {B, N, YH, YW});
    float* y = out.GetTensorMutableData<float>();
    if (B == 0) return;
    const int64_t plane = p.Hp * p.Wp, image = C * plane + kw * dw + 16;  // slack: junk-column and whole-register reads
    float* xp = Buf(tls_f, (size_t)(B * image));
    int32_t* offset = Buf(tls_i32, (size_t)K);
    for (int64_t c = 0, k = 0; c < C; ++c)
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j) offset[k++] = (int32_t)(c * plane + i * dh * p.Wp + j * dw);
    p.offset = offset;
    auto pad = [&](int64_t t) {  // one (image, channel) plane per task
      const int64_t b = t / C, c = t % C;
      float* d = xp + b * image + c * plane;
      tbl->sparse_conv_pad(x.as<float>() + (b * C + c) * H * W, H, W, pt, pl, p.Hp, p.Wp, d);
      if (c == C - 1) std::fill(d + plane, xp + (b + 1) * image, 0.0f);
    };
    Parallel(ctx, B * C, pad);
    auto run = [&](int64_t t) {  // one (image, output channel) plane per task
      const int64_t b = t / N, co = t % N;
      SparseConvParams q = p;
      q.xp = xp + b * image;
      q.y = y + (b * N + co) * YH * YW;
      tbl->sparse_conv_plane(q, co, Buf(tls_plane, (size_t)(p.OH * std::max(p.Wp, p.OW) + 16)));  // +16: whole-register reads
    };
    Parallel(ctx, B * N, run);
  }
};

struct QuantKernel : KernelBase {
  static constexpr const char* kName = "QuantMatMul";
  int64_t bits, bs;
  explicit QuantKernel(const OrtKernelInfo* info) : KernelBase(info, kName) {
    Ort::ConstKernelInfo ki(info);
    bits = GetInt(ki, kName, "bits", 4);
    bs = GetInt(ki, kName, "block_size", 32);
    if (bits != 4 && bits != 8) Fail(kName, "attribute bits must be 4 or 8, got ", bits);
    if (bs != 32 && bs != 64 && bs != 128) Fail(kName, "attribute block_size must be 32, 64 or 128, got ", bs);
  }
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const int64_t nb = Ceil(K, bs), NB = Ceil(N, 16);
    XInfo xi = CheckX(kName, GetIn(ctx, 0), K, N);
    In w = Input(ctx, 1), sc = Input(ctx, 2), zp = Input(ctx, 3);
    Expect(kName, w, "weights", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {NB, nb, bs * 2 * bits});
    if (!sc.present) Fail(kName, "input 'scales' is required");
    if (sc.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && sc.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
      Fail(kName, "input 'scales' must be float32 or float16, got ", TypeName(sc.type));
    Expect(kName, sc, "scales", sc.type, {NB, nb, 16});
    if (zp.present) Expect(kName, zp, "zero_points", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {NB, nb, 16});
    const float* bias = CheckBias(kName, Input(ctx, 4), N);
    auto out = ctx.GetOutput(0, xi.out_shape);
    float* y = out.GetTensorMutableData<float>();
    const int64_t M = xi.M;
    if (M == 0) return;
    const int64_t KX = nb * bs;
    int8_t* xq = Buf(tls_i8, (size_t)(M * KX));
    float* sx = Buf(tls_f, (size_t)(M * nb));
    int32_t* sumx = Buf(tls_i32, (size_t)(M * nb));
    auto prep = [&](int64_t i) {
      const int64_t r0 = i * 8, r1 = std::min(M, r0 + 8);
      for (int64_t m = r0; m < r1; ++m) tbl->quant_x(xi.x + m * K, K, bs, nb, xq + m * KX, sx + m * nb, sumx + m * nb);
    };
    Parallel(ctx, Ceil(M, 8), prep);
    QuantParams p{M, K, N, bits, bs, nb, NB, w.as<uint8_t>(), sc.data,
                  sc.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, zp.present ? zp.as<uint8_t>() : nullptr,
                  bias, xq, sx, sumx, y};
    Plan plan = MakePlan(M, NB, 4);
    auto run = [&](int64_t t) {
      int64_t r0, r1, c0, c1;
      plan.range(t, r0, r1, c0, c1);
      if (r0 < r1 && c0 < c1) tbl->quant_gemm(p, r0, r1, c0, c1);
    };
    Parallel(ctx, plan.tasks(), run);
  }
};

// ------------------------------------------------------------------ ORT op wrappers

template <class Kern>
struct KernelWrap : Kern {
  using Kern::Kern;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      this->Compute(context);
      return nullptr;
    } catch (const OpError& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), (std::string("ai.onnxopt.") + Kern::kName + ": " + e.what()).c_str());
    } catch (const std::bad_alloc&) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string("ai.onnxopt.") + Kern::kName + ": out of memory").c_str());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string("ai.onnxopt.") + Kern::kName + ": " + e.what()).c_str());
    } catch (...) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string("ai.onnxopt.") + Kern::kName + ": unknown error").c_str());
    }
  }
};

struct InputSpec {
  ONNXTensorElementDataType type;
  bool optional;
};

template <class Kern>
struct Op : Ort::CustomOpBase<Op<Kern>, KernelWrap<Kern>, true> {
  std::vector<InputSpec> ins;
  explicit Op(std::vector<InputSpec> in) : ins(std::move(in)) {}
  const char* GetName() const { return Kern::kName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return ins.size(); }
  ONNXTensorElementDataType GetInputType(size_t i) const { return ins[i].type; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return ins[i].optional ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                           : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new KernelWrap<Kern>(info);
      return nullptr;
    } catch (const std::exception& e) {
      *kernel = nullptr;
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    } catch (...) {
      *kernel = nullptr;
      return api.CreateStatus(ORT_FAIL, "ai.onnxopt: unknown error creating kernel");
    }
  }
};

constexpr auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto ANY = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;

Op<BinaryKernel>& BinaryOp() {
  static Op<BinaryKernel> op({{F32, false}, {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32, false}, {F32, false}, {F32, true}});
  return op;
}
Op<XnorKernel>& XnorOp() {
  static Op<XnorKernel> op({{F32, false}, {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64, false}, {F32, false}, {F32, true}});
  return op;
}
// X, values, indices, col_ptr, scales[, bias]
std::vector<InputSpec> SparseInputs() {
  return {{F32, false}, {ANY, false}, {ANY, false}, {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, false}, {F32, false}, {F32, true}};
}
Op<SparseKernel>& SparseOp() {
  static Op<SparseKernel> op(SparseInputs());
  return op;
}
Op<SparseConvKernel>& SparseConvOp() {
  static Op<SparseConvKernel> op(SparseInputs());
  return op;
}
Op<QuantKernel>& QuantOp() {
  static Op<QuantKernel> op({{F32, false},
                             {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, false},
                             {ANY, false},
                             {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, true},
                             {F32, true}});
  return op;
}

std::mutex g_mu;
std::vector<Ort::CustomOpDomain>& Domains() {
  static auto* d = new std::vector<Ort::CustomOpDomain>();  // leaked: sessions may outlive statics
  return *d;
}

// Extra registration hooks (e.g. the CUDA ops when built with ONNXOPT_CUDA).
#if defined(ONNXOPT_WITH_CUDA)
}  // namespace
void RegisterCudaOps(Ort::CustomOpDomain& domain);  // kernels/cuda/
namespace {
#endif

}  // namespace
}  // namespace onnxopt

ONNXOPT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace onnxopt;
  const OrtApi* api = api_base ? api_base->GetApi(ORT_API_VERSION) : nullptr;
  if (!api) {
    // onnxruntime older than the headers we were built with: report with the oldest API.
    const OrtApi* old = api_base ? api_base->GetApi(1) : nullptr;
    return old ? old->CreateStatus(ORT_FAIL, "onnxopt kernels need onnxruntime >= 1.21 (ORT API 21)") : nullptr;
  }
  Ort::InitApi(api);
  try {
    // Validate ONNXOPT_ISA early so a bad value fails at registration with a clear message.
    (void)SelectKernelTable();
    std::lock_guard<std::mutex> lk(g_mu);
    Ort::CustomOpDomain domain{kDomain};
    domain.Add(&BinaryOp());
    domain.Add(&XnorOp());
    domain.Add(&SparseOp());
    domain.Add(&SparseConvOp());
    domain.Add(&QuantOp());
#if defined(ONNXOPT_WITH_CUDA)
    RegisterCudaOps(domain);
#endif
    Ort::UnownedSessionOptions so(options);
    so.Add(domain);
    Domains().push_back(std::move(domain));
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

// ISA introspection for onnxopt.kernels (ctypes). Reads ONNXOPT_ISA at call time.
ONNXOPT_EXPORT const char* onnxopt_isa(void) {
  try {
    return onnxopt::SelectKernelTable()->name;
  } catch (...) {
    return "invalid";
  }
}

ONNXOPT_EXPORT int onnxopt_isa_supported(const char* name) { return onnxopt::IsaSupported(name) ? 1 : 0; }

ONNXOPT_EXPORT const char* onnxopt_kernels_version(void) { return "1"; }
