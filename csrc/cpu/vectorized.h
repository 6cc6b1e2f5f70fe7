// RNNKERN_VECTORIZED: the pointwise row functions are compiled for AVX-512 and AVX2 as well as
// for the baseline ISA, and the loader picks one (function multiversioning), so their loops
// run 16 or 8 floats wide where the CPU allows without the build having to target it. (The
// AVX-512 version made the LSTM forward's recurrence 7% faster on a Zen 4; GCC names the
// x86-64-v4 level from 11 on.)
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && __GNUC__ >= 11
#define RNNKERN_VECTORIZED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define RNNKERN_VECTORIZED __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RNNKERN_VECTORIZED
#endif
