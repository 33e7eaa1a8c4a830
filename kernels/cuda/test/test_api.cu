// C entry points for tests and benchmarks (loaded with ctypes by tests/test_cuda_kernels.py and
// bench/cuda_kernels.py): run an op on host arrays, time it with device-resident weights, and
// time cuBLAS SGEMM as the fp32 anchor. Not part of the onnxruntime custom-op library.
#include <cuda_runtime.h>
#ifdef ONNXOPT_CUDA_HAVE_CUBLAS
#include <cublas_v2.h>
#endif

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../onnxopt_cuda.h"

using namespace onnxopt::cuda;

namespace {

// Device copies that free themselves.
struct DeviceBuffer {
  void* ptr = nullptr;
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) {
    if (bytes) CheckCuda(cudaMalloc(&ptr, bytes), "cudaMalloc");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr(o.ptr) { o.ptr = nullptr; }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
};

size_t ElementBytes(DType t) {
  switch (t) {
    case DType::F16:
    case DType::U16: return 2;
    case DType::I8:
    case DType::U8: return 1;
    case DType::U64: return 8;
    default: return 4;
  }
}

int Report(const char* msg, char* err, int errlen) {
  if (err && errlen > 0) {
    std::strncpy(err, msg, (size_t)errlen - 1);
    err[errlen - 1] = '\0';
  }
  return 1;
}

// Host description of the inputs: rank < 0 marks an absent optional input; dims are concatenated.
std::vector<Tensor> HostTensors(int n_inputs, const void* const* data, const int* dtypes, const int* ranks,
                                const int64_t* dims) {
  std::vector<Tensor> t((size_t)n_inputs);
  for (int i = 0; i < n_inputs; ++i) {
    if (ranks[i] < 0) continue;
    t[i].present = true;
    t[i].data = data[i];
    t[i].dtype = static_cast<DType>(dtypes[i]);
    t[i].shape.assign(dims, dims + ranks[i]);
    dims += ranks[i];
  }
  return t;
}

Attrs MakeAttrs(const int64_t* a) { return Attrs{a[0], a[1], a[2], a[3]}; }

// Uploads the tensors; Tensor::data is replaced by the device pointer.
std::vector<DeviceBuffer> Upload(std::vector<Tensor>& t) {
  std::vector<DeviceBuffer> bufs;
  for (Tensor& x : t) {
    if (!x.present) continue;
    const size_t bytes = (size_t)x.size() * ElementBytes(x.dtype);
    bufs.emplace_back(bytes);
    if (bytes) CheckCuda(cudaMemcpy(bufs.back().ptr, x.data, bytes, cudaMemcpyHostToDevice), "upload");
    x.data = bufs.back().ptr;
  }
  return bufs;
}

}  // namespace

extern "C" {

int onnxopt_cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

int onnxopt_cuda_device_name(char* out, int len) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) return 1;
  std::snprintf(out, (size_t)len, "%s (sm_%d%d, %d SMs)", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
  return 0;
}

// Validates (shapes on the host, CSC structure on the device), runs `op` once and copies Y back.
// attrs: K, N, bits, block_size. Returns 0, or 1 with the error message in err.
int onnxopt_cuda_run_host(int op, const int64_t* attrs, int n_inputs, const void* const* data, const int* dtypes,
                          const int* ranks, const int64_t* dims, float* y, int64_t y_size, char* err, int errlen) {
  try {
    std::vector<Tensor> t = HostTensors(n_inputs, data, dtypes, ranks, dims);
    Validate(static_cast<Op>(op), MakeAttrs(attrs), t);  // before any device work
    std::vector<DeviceBuffer> bufs = Upload(t);
    const Problem p = Validate(static_cast<Op>(op), MakeAttrs(attrs), t);
    if (p.M * p.attrs.N != y_size) throw Error("output buffer has the wrong size");
    CheckSparseStructure(p, nullptr);
    DeviceBuffer dy((size_t)y_size * sizeof(float)), ws(WorkspaceBytes(p));
    Launch(p, static_cast<float*>(dy.ptr), ws.ptr, nullptr);
    CheckCuda(cudaDeviceSynchronize(), "kernel execution");
    if (y_size) CheckCuda(cudaMemcpy(y, dy.ptr, (size_t)y_size * sizeof(float), cudaMemcpyDeviceToHost), "download");
    return 0;
  } catch (const std::exception& e) {
    return Report(e.what(), err, errlen);
  }
}

// Mean milliseconds per call over `iters` calls; `copies` distinct copies of the weight inputs
// (all but X and bias) rotate so that a large enough count defeats the L2 cache ("cold").
int onnxopt_cuda_bench_host(int op, const int64_t* attrs, int n_inputs, const void* const* data, const int* dtypes,
                            const int* ranks, const int64_t* dims, int copies, int iters, double* ms, char* err,
                            int errlen) {
  try {
    std::vector<Tensor> host = HostTensors(n_inputs, data, dtypes, ranks, dims);
    const Problem hp = Validate(static_cast<Op>(op), MakeAttrs(attrs), host);
    std::vector<std::vector<Tensor>> sets;
    std::vector<DeviceBuffer> bufs;
    std::vector<Tensor> shared = host;
    for (int i = 0; i < n_inputs; ++i)  // X and bias: one copy
      if (i != 0 && i != n_inputs - 1) shared[i].present = false;
    bufs = Upload(shared);
    for (int c = 0; c < std::max(copies, 1); ++c) {
      std::vector<Tensor> w = host;
      for (int i = 0; i < n_inputs; ++i)
        if (i == 0 || i == n_inputs - 1) w[i].present = false;
      for (auto& b : Upload(w)) bufs.push_back(std::move(b));
      for (int i = 0; i < n_inputs; ++i)
        if (i == 0 || i == n_inputs - 1) w[i] = shared[i];
      sets.push_back(w);
    }
    std::vector<Problem> problems;
    for (auto& s : sets) problems.push_back(Validate(hp.op, hp.attrs, s));
    CheckSparseStructure(problems[0], nullptr);
    DeviceBuffer dy((size_t)(hp.M * hp.attrs.N) * sizeof(float)), ws(WorkspaceBytes(hp));
    for (int i = 0; i < 3; ++i) Launch(problems[i % problems.size()], static_cast<float*>(dy.ptr), ws.ptr, nullptr);
    cudaEvent_t a, b;
    CheckCuda(cudaEventCreate(&a), "event");
    CheckCuda(cudaEventCreate(&b), "event");
    CheckCuda(cudaEventRecord(a), "event");
    for (int i = 0; i < iters; ++i)
      Launch(problems[i % problems.size()], static_cast<float*>(dy.ptr), ws.ptr, nullptr);
    CheckCuda(cudaEventRecord(b), "event");
    CheckCuda(cudaEventSynchronize(b), "kernel execution");
    float total = 0.f;
    cudaEventElapsedTime(&total, a, b);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    *ms = total / iters;
    return 0;
  } catch (const std::exception& e) {
    return Report(e.what(), err, errlen);
  }
}

// cuBLAS SGEMM Y(M,N) = X(M,K) W(K,N) row-major, fp32 (tf32=0) or TF32 tensor cores (tf32=1).
int onnxopt_cuda_bench_sgemm(int64_t M, int64_t K, int64_t N, int copies, int iters, int tf32, double* ms, char* err,
                             int errlen) {
#ifdef ONNXOPT_CUDA_HAVE_CUBLAS
  try {
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) throw Error("cublasCreate failed");
    cublasSetMathMode(h, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH);
    DeviceBuffer x((size_t)(M * K) * 4), y((size_t)(M * N) * 4);
    std::vector<DeviceBuffer> w;
    for (int c = 0; c < std::max(copies, 1); ++c) {
      w.emplace_back((size_t)(K * N) * 4);
      CheckCuda(cudaMemset(w.back().ptr, 0, (size_t)(K * N) * 4), "memset");
    }
    CheckCuda(cudaMemset(x.ptr, 0, (size_t)(M * K) * 4), "memset");
    const float one = 1.f, zero = 0.f;
    auto run = [&](int i) {
      // column-major view: Y^T (N x M) = W^T (N x K) * X^T (K x M)
      if (cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, (int)N, (int)M, (int)K, &one,
                      static_cast<const float*>(w[i % w.size()].ptr), (int)N, static_cast<const float*>(x.ptr),
                      (int)K, &zero, static_cast<float*>(y.ptr), (int)N) != CUBLAS_STATUS_SUCCESS)
        throw Error("cublasSgemm failed");
    };
    for (int i = 0; i < 3; ++i) run(i);
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    cudaEventRecord(a);
    for (int i = 0; i < iters; ++i) run(i);
    cudaEventRecord(b);
    CheckCuda(cudaEventSynchronize(b), "sgemm execution");
    float total = 0.f;
    cudaEventElapsedTime(&total, a, b);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cublasDestroy(h);
    *ms = total / iters;
    return 0;
  } catch (const std::exception& e) {
    return Report(e.what(), err, errlen);
  }
#else
  (void)M, (void)K, (void)N, (void)copies, (void)iters, (void)tf32, (void)ms;
  return Report("built without cuBLAS", err, errlen);
#endif
}

}  // extern "C"
