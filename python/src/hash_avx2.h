/* python/src/hash_avx2.h: XXH3 compiled for AVX2 (hash_avx2.c), used by hash.c when the CPU
 * has AVX2. Built only on x86-64 (TL_HAVE_XXH3_AVX2). */
#ifndef TL_PY_HASH_AVX2_H
#define TL_PY_HASH_AVX2_H

#include <stddef.h>
#include <stdint.h>

/* XXH3_64bits_withSeed. */
uint64_t tl__xxh3_avx2(const void* data, size_t len, uint64_t seed);
/* XXH3_64bits_update on a libxxhash XXH3_state_t*: 0, or -1 (XXH_ERROR). */
int tl__xxh3_avx2_update(void* state, const void* data, size_t len);

#endif
