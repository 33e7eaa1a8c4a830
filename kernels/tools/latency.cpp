// onnxopt_latency: batch latency of onnxruntime sessions measured from C++, without the ~8 us that
// each InferenceSession.run call from Python adds (on a sub-0.1 ms model that overhead alone moves a
// speedup by 10-15 %). Driven by onnxopt.validate.native_speedups; not linked against onnxruntime:
// the runtime library (the one the Python package loads) is opened at run time.
//
//   onnxopt_latency LIBONNXRUNTIME SPEC
//
// SPEC, one directive per line (paths last, so they may contain spaces):
//   threads N | rounds R | repeat P
//   custom_ops PATH            a custom-op library registered in every session
//   model PATH                 one session per model, measured in this order
//   feed                       starts the next feed; the feeds are taken in turn, call by call
//   input NAME TYPE RANK D0 .. D(RANK-1) PATH
//                              raw C-order data; TYPE is the ONNX element type number
// Output: one line per round, "round R T0 T1 ..." (median call time of each model in us), then one
// line per model, "check M SUM": the sum of all float/double/integer outputs of the first feed.
// Exit status 2 with a one-line message on stderr for a bad spec, model or input.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Input {
  std::string name;
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;
  std::vector<char> data;
};

struct Spec {
  int threads = 1, rounds = 7, repeat = 10;
  std::vector<std::string> custom_ops, models;
  std::vector<std::vector<Input>> feeds;
};

size_t ElementSize(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return 1;
    default: throw std::runtime_error("input element type " + std::to_string((int)t) + " is not supported");
  }
}

std::string Rest(std::istringstream& in) {
  std::string rest;
  std::getline(in >> std::ws, rest);
  if (rest.empty()) throw std::runtime_error("a path is missing in the spec");
  return rest;
}

Spec ReadSpec(const char* path) {
  std::ifstream file(path);
  if (!file) throw std::runtime_error(std::string("cannot read the spec ") + path);
  Spec spec;
  std::string line;
  while (std::getline(file, line)) {
    std::istringstream in(line);
    std::string word;
    if (!(in >> word)) continue;
    if (word == "threads") in >> spec.threads;
    else if (word == "rounds") in >> spec.rounds;
    else if (word == "repeat") in >> spec.repeat;
    else if (word == "custom_ops") spec.custom_ops.push_back(Rest(in));
    else if (word == "model") spec.models.push_back(Rest(in));
    else if (word == "feed") spec.feeds.emplace_back();
    else if (word == "input" && !spec.feeds.empty()) {
      Input x;
      int type = 0, rank = 0;
      in >> x.name >> type >> rank;
      x.type = (ONNXTensorElementDataType)type;
      size_t count = 1;
      for (int i = 0; i < rank; ++i) {
        int64_t d = -1;
        in >> d;
        if (d < 0) throw std::runtime_error("input " + x.name + ": bad shape in the spec");
        x.shape.push_back(d);
        count *= (size_t)d;
      }
      if (!in) throw std::runtime_error("bad input line in the spec: " + line);
      const std::string data_path = Rest(in);
      std::ifstream data(data_path, std::ios::binary);
      x.data.resize(count * ElementSize(x.type));
      if (!data.read(x.data.data(), (std::streamsize)x.data.size()))
        throw std::runtime_error("input " + x.name + ": " + data_path + " holds fewer bytes than its shape needs");
      spec.feeds.back().push_back(std::move(x));
    } else {
      throw std::runtime_error("unknown line in the spec: " + line);
    }
  }
  if (spec.models.empty() || spec.feeds.empty()) throw std::runtime_error("the spec names no model or no feed");
  if (spec.threads < 1 || spec.rounds < 1 || spec.repeat < 1) throw std::runtime_error("threads, rounds and repeat must be >= 1");
  return spec;
}

double Sum(const Ort::Value& v) {
  if (!v.IsTensor()) return 0.0;
  const auto info = v.GetTensorTypeAndShapeInfo();
  const size_t n = info.GetElementCount();
  double s = 0.0;
  switch (info.GetElementType()) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: for (size_t i = 0; i < n; ++i) s += v.GetTensorData<float>()[i]; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: for (size_t i = 0; i < n; ++i) s += v.GetTensorData<double>()[i]; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: for (size_t i = 0; i < n; ++i) s += (double)v.GetTensorData<int64_t>()[i]; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: for (size_t i = 0; i < n; ++i) s += v.GetTensorData<int32_t>()[i]; break;
    default: break;
  }
  return s;
}

struct Runner {
  Ort::Session session{nullptr};
  std::vector<std::string> output_names;
  std::vector<const char*> outputs;
  std::vector<std::vector<const char*>> input_names;  // per feed
  std::vector<std::vector<Ort::Value>> inputs;        // per feed

  std::vector<Ort::Value> Run(size_t feed) {
    return session.Run(Ort::RunOptions{nullptr}, input_names[feed].data(), inputs[feed].data(), inputs[feed].size(),
                       outputs.data(), outputs.size());
  }
};

int Main(int argc, char** argv) {
  if (argc != 3) throw std::runtime_error("usage: onnxopt_latency LIBONNXRUNTIME SPEC");
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) throw std::runtime_error(std::string("cannot load onnxruntime: ") + dlerror());
  using GetApiBase = const OrtApiBase* (*)();
  auto get_api_base = reinterpret_cast<GetApiBase>(dlsym(lib, "OrtGetApiBase"));
  if (!get_api_base) throw std::runtime_error(std::string(argv[1]) + " has no OrtGetApiBase");
  const OrtApi* api = get_api_base()->GetApi(ORT_API_VERSION);
  if (!api) throw std::runtime_error("this onnxruntime does not provide the C API version the tool was built with");
  Ort::InitApi(api);

  const Spec spec = ReadSpec(argv[2]);
  Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "onnxopt_latency");
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<Runner> runners(spec.models.size());
  for (size_t m = 0; m < spec.models.size(); ++m) {
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(spec.threads);
    options.SetInterOpNumThreads(1);
    for (const std::string& path : spec.custom_ops) options.RegisterCustomOpsLibrary(path.c_str());
    Runner& r = runners[m];
    r.session = Ort::Session(env, spec.models[m].c_str(), options);
    Ort::AllocatorWithDefaultOptions alloc;
    for (size_t i = 0; i < r.session.GetOutputCount(); ++i) r.output_names.push_back(r.session.GetOutputNameAllocated(i, alloc).get());
    for (const std::string& name : r.output_names) r.outputs.push_back(name.c_str());
    for (const auto& feed : spec.feeds) {
      r.input_names.emplace_back();
      r.inputs.emplace_back();
      for (const Input& x : feed) {
        r.input_names.back().push_back(x.name.c_str());
        r.inputs.back().push_back(Ort::Value::CreateTensor(cpu, const_cast<char*>(x.data.data()), x.data.size(),
                                                           x.shape.data(), x.shape.size(), x.type));
      }
    }
  }
  std::vector<double> sums;
  for (Runner& r : runners) {  // warm-up; the first feed's outputs are the check
    double s = 0.0;
    for (const Ort::Value& v : r.Run(0)) s += Sum(v);
    sums.push_back(s);
    r.Run(1 % spec.feeds.size());
  }
  std::vector<double> times((size_t)spec.repeat);
  for (int round = 0; round < spec.rounds; ++round) {
    std::printf("round %d", round);
    for (Runner& r : runners) {
      for (int i = 0; i < spec.repeat; ++i) {
        const auto start = std::chrono::steady_clock::now();
        r.Run((size_t)i % spec.feeds.size());
        times[(size_t)i] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
      }
      std::nth_element(times.begin(), times.begin() + spec.repeat / 2, times.end());
      std::printf(" %.3f", times[(size_t)spec.repeat / 2]);
    }
    std::printf("\n");
  }
  for (size_t m = 0; m < sums.size(); ++m) std::printf("check %zu %.17g\n", m, sums[m]);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Main(argc, argv);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    std::fprintf(stderr, "onnxopt_latency: %s\n", msg.c_str());
    return 2;
  }
}
