/* threadloom/arena.h: NUMA-local, optionally page-locked memory for tensor and batch buffers.
 *
 * A tl_arena_t hands out blocks from one region of memory reserved up front, bound to one NUMA
 * node before it is first touched, and page-locked with cudaHostRegister when a driver and GPU
 * are present, so host-to-device copies from it run at full speed from the GPU's own socket.
 * Blocks come from mimalloc (an exclusive mimalloc arena over the region); each thread that
 * allocates gets its own mimalloc heap in the region, so allocation takes no lock. A block is
 * never served from memory outside the region: a full arena answers TL_ENOMEM.
 *
 * Each allocating thread also keeps a small cache of blocks it freed (at most 8 blocks and 1/16
 * of the region per thread) and serves a request of the same size and alignment from it first.
 * Cached blocks are not in use (stats report them apart); a thread empties its cache when it
 * exits, when tl_arena_trim() or tl_arena_close() runs, or when an allocation finds the arena
 * full, and the other threads empty theirs at their next call after any of these. So an
 * allocation that fails may have missed up to 1/16 of the region per other allocating thread;
 * it succeeds again once those threads have called into the arena (or exited).
 *
 * Regions live for the process: mimalloc 2.0 cannot give an arena back, so tl_arena_close()
 * keeps the region and a later tl_arena_init() with the same node, a size that fits and a
 * compatible pin state reuses it instead of reserving more memory.
 *
 * Thread-safety: the default of threadloom/common.h, except where a function says "thread-safe
 * on one object". Blocks are plain memory: threadloom does not synchronise their contents. */
#ifndef THREADLOOM_ARENA_H
#define THREADLOOM_ARENA_H

#include "threadloom/common.h"

TL_BEGIN_DECLS

typedef struct tl_arena_s tl_arena_t;

/* Regions are reserved in multiples of this (mimalloc's segment alignment). */
#define TL_ARENA_GRANULE ((size_t)64 << 20)
/* The largest alignment tl_arena_alloc() accepts (mimalloc 2.0 cannot align more in an arena). */
#define TL_ARENA_MAX_ALIGNMENT ((size_t)16 << 20)

typedef enum {
  TL_ARENA_PIN_AUTO = 0,    /* page-lock when a driver and GPU are present, else plain memory;
                               tl_arena_stats() says which and why */
  TL_ARENA_PIN_NEVER = 1,   /* plain pageable memory */
  TL_ARENA_PIN_REQUIRE = 2  /* fail (TL_ENODRIVER, TL_ENODEV, TL_ECUDA, TL_ENOSYS) if the region
                               cannot be page-locked */
} tl_arena_pin_t;

typedef struct {
  int numa_node;      /* OS index of the node the memory must live on; -1: no binding */
  size_t size;        /* bytes to reserve; rounded up to a multiple of TL_ARENA_GRANULE. Each
                         allocating thread takes segments of its own (mimalloc's per-thread
                         heaps): allow one granule per allocating thread plus the blocks, and
                         twice the size of blocks of several MiB (measured: 14 live 16 MiB blocks
                         exhausted a 448 MiB arena) */
  tl_arena_pin_t pin; /* page-locking policy */
  int prefault;       /* 1: write one byte per page at init, so the whole region is resident and
                         placed before the first allocation (measured: ~0.7 ms per MiB, 0.6-0.8 s
                         for 1 GiB on the 2-core dev machine); 0: pages are placed on the bound
                         node when first written, and an unused region costs no memory. A region
                         that gets page-locked is faulted in by cudaHostRegister either way */
} tl_arena_options_t;

typedef struct {
  void* base;             /* first byte of the region (diagnostics: blocks lie in
                             [base, base + size); the region stays mapped for the process) */
  int numa_node;          /* the node the region is bound to, -1 for none */
  size_t size;            /* bytes in the region (may exceed the request when reused) */
  int pinned;             /* 1: page-locked with cudaHostRegister */
  char pin_detail[192];   /* why it is (not) pinned: "cudaHostRegister: cudaErrorInsufficient..." */
  size_t bytes_in_use;    /* sum of mi_usable_size over live blocks */
  size_t blocks_in_use;   /* live blocks */
  size_t peak_bytes;      /* highest bytes_in_use seen since init, sampled every 64
                             allocations of a thread and at each stats call */
  uint64_t allocs;        /* successful tl_arena_alloc calls since init */
  uint64_t failed_allocs; /* tl_arena_alloc calls that answered TL_ENOMEM */
  uint64_t cache_hits;    /* allocations (counted in allocs) served by a thread's cache */
  size_t cached_bytes;    /* usable bytes of the blocks the threads' caches hold (not in use,
                             not free for other threads either; see the top of this file) */
  size_t cached_blocks;   /* blocks the threads' caches hold */
} tl_arena_stats_t;

/* Creates an arena: reuses a retained region that fits (same node, size >= the request,
 * compatible pin state) or reserves, binds, (per opts->prefault) touches and (per opts->pin)
 * page-locks a new one.
 * The caller owns *out and releases it with tl_arena_close(). The memory of the region itself
 * stays with the process (see the top of this file).
 * Errors: TL_EINVAL (out or opts NULL, size 0 or too large, bad pin value, a node the kernel
 * does not have), TL_ENOMEM (mmap or binding failed, or mimalloc refused the region),
 * with TL_ARENA_PIN_REQUIRE TL_ENODRIVER, TL_ENODEV, TL_ECUDA, TL_ENOSYS (built without CUDA).
 * tl_err_detail() names the failing call. */
TL_EXTERN int tl_arena_init(tl_arena_t** out, const tl_arena_options_t* opts);

/* Allocates `size` bytes aligned to `alignment` (a power of two up to TL_ARENA_MAX_ALIGNMENT;
 * 0 means 64) from the calling thread's own heap in the arena, and stores the block in *out.
 * The caller owns the block and returns it with tl_arena_free(), from any thread. Thread-safe
 * on one object. The block lies inside the region; its contents are not cleared. A block
 * takes up to size + alignment bytes of the region: large alignments use it up quickly.
 * Errors: TL_EINVAL (NULL argument, size 0, bad alignment), TL_ENOMEM (the arena is full: the
 * detail gives the node, the arena's size and what is in use; free blocks or make a larger
 * arena). On failure *out is NULL. */
TL_EXTERN int tl_arena_alloc(tl_arena_t* a, size_t size, size_t alignment, void** out);

/* Returns a block of this arena; any thread may free any block. Thread-safe on one object.
 * Errors: TL_EINVAL (a NULL, or p not inside this arena's region). */
TL_EXTERN int tl_arena_free(tl_arena_t* a, void* p);

/* Fills *out with a snapshot of the counters (each read atomically; the set is not one instant).
 * Thread-safe on one object. Errors: TL_EINVAL. */
TL_EXTERN int tl_arena_stats(const tl_arena_t* a, tl_arena_stats_t* out);

/* Gives the blocks cached by the calling thread back to mimalloc now, and asks every other
 * thread to give its cached blocks back at its next tl_arena_alloc or tl_arena_free on the
 * arena (or at its exit). For a thread that stops allocating for a while, or before handing the
 * memory to other threads. Thread-safe on one object. Errors: TL_EINVAL (a is NULL). */
TL_EXTERN int tl_arena_trim(tl_arena_t* a);

/* Releases the arena object and retains its region for reuse (trimming it like
 * tl_arena_trim(): cached blocks do not keep it busy). Must not run concurrently with
 * other calls on `a`. NULL is ignored (returns 0).
 * Errors: TL_EBUSY while blocks are live (the arena stays usable; free them first). */
TL_EXTERN int tl_arena_close(tl_arena_t* a);

/* The NUMA node (OS index) of the page holding p, as the kernel reports it (move_pages), for
 * tests and diagnostics. Errors: TL_EINVAL (NULL argument), TL_ENOENT (p's page is not mapped
 * or not yet touched), TL_ENOSYS (the kernel has no NUMA support). */
TL_EXTERN int tl_arena_node_of(const void* p, int* node);

TL_END_DECLS

#endif /* THREADLOOM_ARENA_H */
