// Vector code on CPU without depending on the build machine. The extension is built for baseline
// x86-64 (SSE2); GCC clones the marked functions for AVX2 and picks the clone at load time. No
// FMA in either clone, so both round alike and results do not depend on the machine.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTASPP_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTASPP_AVX2_CLONES
#endif

// For the bodies that clones inline, so that they are compiled for each clone's target.
#if defined(__GNUC__)
#define FASTASPP_INLINE inline __attribute__((always_inline))
#else
#define FASTASPP_INLINE inline
#endif
