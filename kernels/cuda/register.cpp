// onnxruntime registration of the CUDA kernels: the four ai.onnxopt ops for the
// CUDAExecutionProvider. Called from RegisterCustomOps (kernels/src/ops.cpp) when the library is
// built with ONNXOPT_CUDA; inputs and the output live on the device, work runs on the EP's stream.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cuda_runtime.h>

#include <exception>
#include <mutex>
#include <set>
#include <tuple>
#include <vector>

#include "onnxopt_cuda.h"

namespace onnxopt {
namespace {

using cuda::DType;
using cuda::Op;

DType FromOrt(ONNXTensorElementDataType t, Op op, size_t index) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return DType::F32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return DType::F16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return DType::I8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return DType::U8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return DType::U16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return DType::I32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return DType::U32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return DType::U64;
    default:
      throw cuda::Error(std::string(cuda::OpName(op)) + " (CUDA): input '" + cuda::InputName(op, (int)index) +
                        "' has an unsupported element type " + std::to_string((int)t));
  }
}

struct CudaKernel {
  CudaKernel(Op op, const OrtKernelInfo* info) : op_(op) {
    Ort::ConstKernelInfo ki(info);
    attrs_.K = ki.GetAttribute<int64_t>("K");
    attrs_.N = ki.GetAttribute<int64_t>("N");
    if (op == Op::Quant) {
      attrs_.bits = OptionalInt(ki, "bits", 4);
      attrs_.block_size = OptionalInt(ki, "block_size", 32);
    }
    if (op == Op::Sparse) {
      std::string activation = "none";
      try {
        activation = ki.GetAttribute<std::string>("activation");
      } catch (const Ort::Exception&) {  // absent, or of another type: the C++ API throws alike
        int64_t i = 0;
        if (Ort::Status(Ort::GetApi().KernelInfoGetAttribute_int64(ki, "activation", &i)).IsOK())
          throw cuda::Error("SparseMatMul (CUDA): attribute activation must be a string");
      }
      if (activation != "none" && activation != "relu")
        throw cuda::Error("SparseMatMul (CUDA): attribute activation must be \"none\" or \"relu\", got \"" + activation + "\"");
      attrs_.relu = activation == "relu";
    }
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    try {
      Compute(context);
      return nullptr;
    } catch (const cuda::Error& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }

 private:
  static int64_t OptionalInt(const Ort::ConstKernelInfo& ki, const char* name, int64_t dflt) {
    int64_t v = dflt;
    Ort::Status st{Ort::GetApi().KernelInfoGetAttribute_int64(ki, name, &v)};
    return st.IsOK() ? v : dflt;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t given = ctx.GetInputCount();
    std::vector<cuda::Tensor> inputs((size_t)cuda::InputCount(op_));
    for (size_t i = 0; i < inputs.size() && i < given; ++i) {
      Ort::ConstValue v = ctx.GetInput(i);
      if (static_cast<const OrtValue*>(v) == nullptr) continue;  // absent optional input
      auto info = v.GetTensorTypeAndShapeInfo();
      inputs[i].present = true;
      inputs[i].dtype = FromOrt(info.GetElementType(), op_, i);
      inputs[i].shape = info.GetShape();
      inputs[i].data = v.GetTensorRawData();
    }
    const cuda::Problem p = cuda::Validate(op_, attrs_, inputs);
    auto out = ctx.GetOutput(0, cuda::OutputShape(p));
    if (p.M == 0) return;
    auto stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    if (op_ == Op::Sparse) CheckSparseOnce(p, stream);
    const size_t ws_bytes = cuda::WorkspaceBytes(p);
    void* ws = nullptr;
    if (ws_bytes) cuda::CheckCuda(cudaMallocAsync(&ws, ws_bytes, stream), "workspace allocation");
    try {
      cuda::Launch(p, out.GetTensorMutableData<float>(), ws, stream);
    } catch (...) {
      if (ws) cudaFreeAsync(ws, stream);
      throw;
    }
    if (ws) cuda::CheckCuda(cudaFreeAsync(ws, stream), "workspace release");
  }

  // CSC contents are checked on the device once per distinct weight buffers (initializers keep
  // their addresses, so this runs on the first call only); the kernels clamp offsets regardless.
  void CheckSparseOnce(const cuda::Problem& p, cudaStream_t stream) {
    const auto key = std::make_tuple(p.inputs[1].data, p.inputs[2].data, p.inputs[3].data, p.inputs[1].shape[0]);
    std::lock_guard<std::mutex> lock(mu_);
    if (checked_.count(key)) return;
    cuda::CheckSparseStructure(p, stream);
    checked_.insert(key);
  }

  Op op_;
  cuda::Attrs attrs_;
  std::mutex mu_;
  std::set<std::tuple<const void*, const void*, const void*, int64_t>> checked_;
};

template <Op OP>
struct CudaOp : Ort::CustomOpBase<CudaOp<OP>, CudaKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
    try {
      *kernel = new CudaKernel(OP, info);
      return nullptr;
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
  const char* GetName() const { return cuda::OpName(OP); }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return (size_t)cuda::InputCount(OP); }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    constexpr auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ANY = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    if (index == 0 || index == (size_t)cuda::InputCount(OP) - 1) return F32;  // X, bias
    switch (OP) {
      case Op::Binary: return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32 : F32;
      case Op::Xnor: return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64 : F32;
      case Op::Sparse: {
        static const ONNXTensorElementDataType types[] = {F32, ANY, ANY, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, F32};
        return types[index];
      }
      case Op::Quant: return index == 2 ? ANY : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    }
    return ANY;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return cuda::InputOptional(OP, (int)index) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

void RegisterCudaOps(Ort::CustomOpDomain& domain) {
  static CudaOp<Op::Binary> binary;
  static CudaOp<Op::Xnor> xnor;
  static CudaOp<Op::Sparse> sparse;
  static CudaOp<Op::Quant> quant;
  domain.Add(&binary);
  domain.Add(&xnor);
  domain.Add(&sparse);
  domain.Add(&quant);
}

}  // namespace onnxopt
