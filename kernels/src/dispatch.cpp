// Runtime ISA selection (cpuid via __builtin_cpu_supports), overridable by env ONNXOPT_ISA.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace onnxopt {

float HalfToFloat(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FFu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static bool CpuHasAvx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
#else
  return false;
#endif
}

static bool CpuHasAvx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return CpuHasAvx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vpopcntdq");
#else
  return false;
#endif
}

static const KernelTable* TableFor(const std::string& name) {
  if (name == "scalar") return GetKernelTableScalar();
#if defined(ONNXOPT_HAVE_AVX2)
  if (name == "avx2") return CpuHasAvx2() ? GetKernelTableAvx2() : nullptr;
#endif
#if defined(ONNXOPT_HAVE_AVX512)
  if (name == "avx512") return CpuHasAvx512() ? GetKernelTableAvx512() : nullptr;
#endif
  return nullptr;
}

bool IsaSupported(const char* name) { return name && TableFor(name) != nullptr; }

const KernelTable* SelectKernelTable() {
  const char* env = std::getenv("ONNXOPT_ISA");
  if (env && *env && std::strcmp(env, "auto") != 0) {
    const KernelTable* t = TableFor(env);
    if (!t)
      throw std::runtime_error(std::string("onnxopt: ONNXOPT_ISA=") + env +
                               " is not a known ISA level supported by this CPU/build (use scalar, avx2 or avx512)");
    return t;
  }
  if (const KernelTable* t = TableFor("avx512")) return t;
  if (const KernelTable* t = TableFor("avx2")) return t;
  return GetKernelTableScalar();
}

}  // namespace onnxopt
