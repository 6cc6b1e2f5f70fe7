// What the CPU running the process supports, for the kernels' hand-vectorised paths (their
// functions carry __attribute__((target(...))), so the build need not target the CPU). Each
// answer is computed once. False off x86-64 GCC/clang, where those paths are not compiled.
#pragma once

namespace rnnkern::cpu {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
inline bool has_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2");
  return supported;
}
inline bool has_avx2_fma() {
  static const bool supported = has_avx2() && __builtin_cpu_supports("fma");
  return supported;
}
inline bool has_avx2_f16c() {
  static const bool supported = has_avx2() && __builtin_cpu_supports("f16c");
  return supported;
}
#else
inline bool has_avx2() { return false; }
inline bool has_avx2_fma() { return false; }
inline bool has_avx2_f16c() { return false; }
#endif

}  // namespace rnnkern::cpu
