// Host-side checks of shapes, dtypes and attributes for the CUDA ops (no device memory is read).
#include "onnxopt_cuda.h"

namespace onnxopt::cuda {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Python tuple notation. (No iostreams: the test library may carry its own libstdc++ pieces.)
std::string ShapeStr(const std::vector<int64_t>& s) {
  std::string o = "(";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + (s.size() == 1 ? ",)" : ")");
}

[[noreturn]] void Fail(Op op, const std::string& msg) {
  throw Error(std::string(OpName(op)) + " (CUDA): " + msg);
}

void ExpectDType(Op op, int idx, const Tensor& t, std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (t.dtype == d) return;
  std::string names;
  for (DType d : allowed) names += std::string(names.empty() ? "" : " or ") + DTypeName(d);
  Fail(op, std::string("input '") + InputName(op, idx) + "' must be " + names + ", got " + DTypeName(t.dtype));
}

void ExpectShape(Op op, int idx, const Tensor& t, const std::vector<int64_t>& shape) {
  if (t.shape != shape)
    Fail(op, std::string("input '") + InputName(op, idx) + "' must have shape " + ShapeStr(shape) + ", got " +
                 ShapeStr(t.shape));
}

// 16-byte vector loads need aligned bases (onnxruntime's device allocations are 256-byte aligned).
void ExpectAligned(Op op, int idx, const Tensor& t, size_t align) {
  if (t.present && t.data && reinterpret_cast<uintptr_t>(t.data) % align != 0)
    Fail(op, std::string("input '") + InputName(op, idx) + "' must be " + std::to_string(align) +
                 "-byte aligned on the device");
}

}  // namespace

const char* OpName(Op op) {
  switch (op) {
    case Op::Binary: return "BinaryMatMul";
    case Op::Xnor: return "XnorMatMul";
    case Op::Sparse: return "SparseMatMul";
    case Op::Quant: return "QuantMatMul";
  }
  return "?";
}

const char* DTypeName(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::I8: return "int8";
    case DType::U8: return "uint8";
    case DType::U16: return "uint16";
    case DType::I32: return "int32";
    case DType::U32: return "uint32";
    case DType::U64: return "uint64";
  }
  return "?";
}

int64_t Tensor::size() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int InputCount(Op op) {
  switch (op) {
    case Op::Binary:
    case Op::Xnor: return 4;
    case Op::Sparse: return 6;
    case Op::Quant: return 5;
  }
  return 0;
}

const char* InputName(Op op, int index) {
  static const char* binary[] = {"X", "bits", "alpha", "bias"};
  static const char* sparse[] = {"X", "values", "indices", "col_ptr", "scales", "bias"};
  static const char* quant[] = {"X", "weights", "scales", "zero_points", "bias"};
  if (index < 0 || index >= InputCount(op)) return "?";
  switch (op) {
    case Op::Binary:
    case Op::Xnor: return binary[index];
    case Op::Sparse: return sparse[index];
    case Op::Quant: return quant[index];
  }
  return "?";
}

bool InputOptional(Op op, int index) {
  if (index == InputCount(op) - 1) return true;  // bias
  return op == Op::Quant && index == 3;          // zero_points
}

void CheckCuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw Error(std::string("onnxopt CUDA: ") + what + ": " + cudaGetErrorString(err));
}

Problem Validate(Op op, const Attrs& a, const std::vector<Tensor>& inputs) {
  const int count = InputCount(op);
  if (static_cast<int>(inputs.size()) != count)
    Fail(op, "expected " + std::to_string(count) + " input slots, got " + std::to_string(inputs.size()));
  for (int i = 0; i < count; ++i)
    if (!inputs[i].present && !InputOptional(op, i))
      Fail(op, std::string("required input '") + InputName(op, i) + "' is missing");
  if (a.K < 1 || a.N < 1)
    Fail(op, "attributes K and N must be >= 1, got K=" + std::to_string(a.K) + ", N=" + std::to_string(a.N));
  if (a.K > (int64_t(1) << 30) || a.N > 500000)
    Fail(op, "K or N too large for the CUDA kernels (K <= 2^30, N <= 500000)");
  const int64_t K = a.K, N = a.N;

  Problem p{op, a, 0, inputs};
  const Tensor& x = inputs[0];
  ExpectDType(op, 0, x, {DType::F32});
  if (x.shape.empty()) Fail(op, "X must have rank >= 1");
  if (x.shape.back() != K)
    Fail(op, "X last dimension " + std::to_string(x.shape.back()) + " != K=" + std::to_string(K));
  p.M = x.size() / K;
  if (p.M > (int64_t(1) << 31) - 1) Fail(op, "too many rows in X");

  const Tensor& bias = inputs[count - 1];
  if (bias.present) {
    ExpectDType(op, count - 1, bias, {DType::F32});
    ExpectShape(op, count - 1, bias, {N});
  }

  switch (op) {
    case Op::Binary:
    case Op::Xnor: {
      const bool bin = op == Op::Binary;
      const int64_t cb = bin ? 16 : 8, wb = bin ? 32 : 64;
      ExpectDType(op, 1, inputs[1], {bin ? DType::U32 : DType::U64});
      ExpectShape(op, 1, inputs[1], {CeilDiv(N, cb), CeilDiv(K, wb), cb});
      ExpectDType(op, 2, inputs[2], {DType::F32});
      ExpectShape(op, 2, inputs[2], {N});
      ExpectAligned(op, 1, inputs[1], bin ? 4 : 8);
      break;
    }
    case Op::Sparse: {
      if (N >= (int64_t(1) << 31) - 1) Fail(op, "N too large for int32 col_ptr");
      const Tensor &values = inputs[1], &indices = inputs[2], &col_ptr = inputs[3], &scales = inputs[4];
      ExpectDType(op, 1, values, {DType::F32, DType::F16, DType::I8});
      if (values.shape.size() != 1) Fail(op, "input 'values' must be 1-D, got shape " + ShapeStr(values.shape));
      const int64_t nnz = values.shape[0];
      if (nnz > (int64_t(1) << 31) - 1) Fail(op, "too many nonzeros for int32 col_ptr");
      ExpectDType(op, 2, indices, {DType::U16, DType::U32});
      ExpectShape(op, 2, indices, {nnz});
      ExpectDType(op, 3, col_ptr, {DType::I32});
      ExpectShape(op, 3, col_ptr, {N + 1});
      ExpectDType(op, 4, scales, {DType::F32});
      ExpectShape(op, 4, scales, {N});
      break;
    }
    case Op::Quant: {
      if (a.bits != 4 && a.bits != 8) Fail(op, "attribute bits must be 4 or 8, got " + std::to_string(a.bits));
      const int64_t bs = a.block_size;
      if (bs != 32 && bs != 64 && bs != 128)
        Fail(op, "attribute block_size must be 32, 64 or 128, got " + std::to_string(bs));
      const int64_t NB = CeilDiv(N, 16), nb = CeilDiv(K, bs);
      ExpectDType(op, 1, inputs[1], {DType::U8});
      ExpectShape(op, 1, inputs[1], {NB, nb, bs * 2 * a.bits});
      ExpectDType(op, 2, inputs[2], {DType::F32, DType::F16});
      ExpectShape(op, 2, inputs[2], {NB, nb, 16});
      if (inputs[3].present) {
        ExpectDType(op, 3, inputs[3], {DType::U8});
        ExpectShape(op, 3, inputs[3], {NB, nb, 16});
        ExpectAligned(op, 3, inputs[3], 4);
      }
      ExpectAligned(op, 1, inputs[1], 16);
      ExpectAligned(op, 2, inputs[2], inputs[2].dtype == DType::F32 ? 16 : 8);
      break;
    }
  }
  return p;
}

std::vector<int64_t> OutputShape(const Problem& p) {
  std::vector<int64_t> s = p.inputs[0].shape;
  s.back() = p.attrs.N;
  return s;
}

}  // namespace onnxopt::cuda
