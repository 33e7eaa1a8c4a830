// onnxopt CUDA kernels for the ai.onnxopt ops (BinaryMatMul, XnorMatMul, SparseMatMul, QuantMatMul).
//
// Weight layouts are exactly those of onnxopt/ops.py (its packers produce them, its numpy
// `reference` is the specification). This header is independent of onnxruntime: the ORT glue
// (ort_cuda_ops.cc), the ctypes test entry points (test_api.cu) and the benchmark use it alike.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace onnxopt::cuda {

// Bad shapes, dtypes, attributes or weight contents; the message names the op and the input.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Op : int { Binary = 0, Xnor = 1, Sparse = 2, Quant = 3 };
enum class DType : int { F32 = 0, F16 = 1, I8 = 2, U8 = 3, I32 = 4, U32 = 5, U64 = 6, U16 = 7 };

const char* OpName(Op op);
const char* DTypeName(DType t);

// A device tensor as handed to a kernel. `present` is false for an absent optional input.
struct Tensor {
  bool present = false;
  const void* data = nullptr;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  int64_t size() const;
};

// Node attributes (bits, block_size: QuantMatMul; relu: SparseMatMul's activation="relu").
struct Attrs {
  int64_t K = 0, N = 0, bits = 4, block_size = 32;
  bool relu = false;
};

// Number of inputs of `op` including X and bias; inputs are in the ops.py order:
//   Binary/Xnor: X, bits, alpha, bias?        Sparse: X, values, indices, col_ptr, scales, bias?
//   Quant: X, weights, scales, zero_points?, bias?
int InputCount(Op op);
bool InputOptional(Op op, int index);
const char* InputName(Op op, int index);

// A call whose shapes, dtypes and attributes were checked against each other (host only: no
// device memory is read). M = product of X's leading dimensions.
struct Problem {
  Op op;
  Attrs attrs;
  int64_t M = 0;
  std::vector<Tensor> inputs;  // InputCount(op) entries
};

// Throws Error naming the op and input when anything disagrees with the layouts of ops.py.
Problem Validate(Op op, const Attrs& attrs, const std::vector<Tensor>& inputs);
std::vector<int64_t> OutputShape(const Problem& p);

// Device scratch that Launch needs (0 when none).
size_t WorkspaceBytes(const Problem& p);

// Enqueues the kernels on `stream`; y: device float32 [M, N]; workspace: WorkspaceBytes(p) bytes.
// Memory-safe for any weight contents (CSC offsets and indices are clamped in the kernels).
void Launch(const Problem& p, float* y, void* workspace, cudaStream_t stream);

// SparseMatMul only: checks col_ptr (starts at 0, non-decreasing, ends at nnz) and indices
// (row < K) on the device, synchronizing `stream`; throws Error on failure.
void CheckSparseStructure(const Problem& p, cudaStream_t stream);

// Throws Error with `what` and the CUDA error string when `err` is not cudaSuccess.
void CheckCuda(cudaError_t err, const char* what);

}  // namespace onnxopt::cuda
