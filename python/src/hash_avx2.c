/* python/src/hash_avx2.c: XXH3 compiled for AVX2, for the checkpoint checksums.
 *
 * libxxhash as distributions build it targets baseline x86-64 (SSE2): ~19 GB/s on the 2-core
 * VM whether the bytes are in cache or not, so it is compute-bound, and the hash was ~60% of
 * the checkpoint writers' CPU. The same XXH3 inlined from xxhash.h and compiled with -mavx2
 * (this file only; CMake adds the flag) hashes at memory speed from DRAM (23 GB/s there) and
 * ~47 GB/s from cache. XXH3 is one function whatever the vector width: the digests are the
 * library's, bit for bit (tests/python/test_hash.py compares both).
 *
 * hash.c calls these only when the CPU has AVX2 (tl__xxh3_avx2_usable). The streaming state
 * is the library's XXH3_state_t (created and freed by libxxhash): its layout comes from the
 * same xxhash.h and does not depend on the vector width, so both implementations may update
 * one state. The inlined symbols are static (XXH_INLINE_ALL), so nothing clashes with the
 * library. Thread-safety: none needed beyond the caller's (no state of its own). */
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "hash_avx2.h"

#if !defined(__AVX2__)
#error "hash_avx2.c must be compiled with -mavx2 (see CMakeLists.txt)"
#endif

uint64_t tl__xxh3_avx2(const void* data, size_t len, uint64_t seed) {
  return XXH3_64bits_withSeed(data, len, seed);
}

int tl__xxh3_avx2_update(void* state, const void* data, size_t len) {
  /* The library's XXH3_state_t, seen through the inlined copy's name for the same struct. */
  return XXH3_64bits_update((XXH3_state_t*)state, data, len) == XXH_OK ? 0 : -1;
}
