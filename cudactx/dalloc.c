/* cudactx/dalloc.c: the caching device allocator, one cache per stream.
 *
 * cudaMalloc and cudaFree are slow (cudaFree synchronises the device), so freed blocks are kept
 * and reused, as torch's CUDACachingAllocator does. Sizes are rounded up to classes (512 bytes,
 * then 4 classes per power of two: at most 25% waste), and each stream has its own cache of
 * free blocks per class. A block is reused only by allocations on the stream it was allocated
 * for: stream order guarantees that whatever that stream queued before the free (the last uses
 * of the block) runs before whatever it queues after the next allocation. A block that other
 * streams used (tl_dbuf_record_stream, or tl_dbuf_record_handle for a stream of another
 * library: a DLPack consumer's) is not reusable at its free: an event is recorded on
 * each of those streams, and the block waits in its stream's pending list until they have all
 * completed (checked when that stream allocates and misses). Nothing ever blocks the host for
 * reuse, and no event is recorded for the common single-stream case.
 *
 * Invariants:
 * - A block is in exactly one place: handed out, in its stream's free list of its class, or in
 *   its stream's pending list. Every list and counter of a stream's cache is under its mutex.
 * - The mutex belongs to one stream: threads that allocate on different streams (the per-thread
 *   pools give every thread its own) share nothing; a free from another thread takes the
 *   block's stream's mutex once.
 * - Caches are created on a stream's first allocation (published with a compare-exchange) and
 *   live for the process, as streams do; the device keeps no list of them: statistics and
 *   empty_cache walk the device's streams.
 * - tl_device_empty_cache synchronises the device before giving blocks back, so a block whose
 *   last use is still queued on its stream is never freed under it (cudaFree would synchronise
 *   too; the sim would report a use after free). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cudactx/internal.h"

#define TL__NCLS (1 + 55 * 4) /* 512 bytes, then 4 classes per power of two up to 2^63 */
#define TL__MAX_USES 8        /* other streams a block may be recorded on */

typedef struct tl__dblock_s {
  tl_dbuf_t pub;                 /* what the caller sees; first, so a tl_dbuf_t* is the block */
  size_t cap;                    /* its class size: the bytes taken from the device */
  int cls;                       /* class index */
  tl_stream_t* stream;           /* the stream it belongs to */
  struct tl__dblock_s* next;     /* free or pending list link (the stream's cache mutex) */
  tl_stream_t* uses[TL__MAX_USES]; /* other streams that used it (the cache mutex) */
  int nuses;
  void* foreign[TL__MAX_USES];   /* other libraries' stream handles that used it (the mutex) */
  int nforeign;
  tl_event_t* evs[2 * TL__MAX_USES]; /* events recorded on all of them at the free (pending) */
  int nevs;
  int stuck;                     /* an event could not be recorded at its free: reusable only
                                    after tl_device_empty_cache's device sync */
} tl__dblock_t;

typedef struct tl__spool_s {
  pthread_mutex_t mu;
  tl__dblock_t* free[TL__NCLS];  /* reusable on the stream at once */
  tl__dblock_t* pending;         /* waiting for events on other streams */
  size_t in_use_bytes, in_use_blocks, cached_bytes, cached_blocks, peak;
  uint64_t allocs, hits, device_allocs, device_frees, oom_retries;
} tl__spool_t;

/* The class of `size` and its size. */
static int tl__class(size_t size, size_t* cap) {
  if (size <= 512) {
    *cap = 512;
    return 0;
  }
  int k = 63 - __builtin_clzll((unsigned long long)(size - 1)); /* 2^k < size <= 2^(k+1) */
  size_t step = (size_t)1 << (k - 2);
  size_t base = (size_t)1 << k;
  size_t j = (size - base + step - 1) / step; /* 1..4 */
  *cap = base + j * step;
  return 1 + (k - 9) * 4 + (int)(j - 1);
}

static tl__spool_t* tl__spool(tl_stream_t* s) {
  tl__spool_t* p = atomic_load_explicit(&s->pool, memory_order_acquire);
  if (p) return p;
  tl__spool_t* fresh = calloc(1, sizeof *fresh);
  if (!fresh) return NULL;
  pthread_mutex_init(&fresh->mu, NULL);
  if (!atomic_compare_exchange_strong_explicit(&s->pool, &p, fresh, memory_order_acq_rel,
                                               memory_order_acquire)) {
    pthread_mutex_destroy(&fresh->mu);
    free(fresh); /* another thread published one first: p is it */
    return p;
  }
  return fresh;
}

/* Moves pending blocks whose events all completed to the free lists (p->mu held). */
static void tl__reap(tl__spool_t* p) {
  for (tl__dblock_t** pp = &p->pending; *pp;) {
    tl__dblock_t* b = *pp;
    int done = !b->stuck;
    for (int i = 0; i < b->nevs && done; i++) {
      int rc = b->evs[i]->api->event_query(b->evs[i]->h);
      done = rc != TL__CUDA_NOT_READY; /* an error: that work will never touch it again */
    }
    if (!done) {
      pp = &b->next;
      continue;
    }
    for (int i = 0; i < b->nevs; i++) tl_event_close(b->evs[i]);
    b->nevs = 0;
    b->nuses = 0;
    b->nforeign = 0;
    *pp = b->next;
    b->next = p->free[b->cls];
    p->free[b->cls] = b;
  }
}

static void tl__account_alloc(tl__spool_t* p, tl__dblock_t* b, int hit) {
  p->allocs++;
  p->hits += hit;
  if (hit) {
    p->cached_bytes -= b->cap;
    p->cached_blocks--;
  }
  p->in_use_bytes += b->cap;
  p->in_use_blocks++;
  if (p->in_use_bytes > p->peak) p->peak = p->in_use_bytes;
}

/* Gives every cached block of p back to the device, the pending ones too: the caller has
 * synchronised the device, so no work uses them any more. Returns the first error. */
static int tl__spool_release(tl_device_t* dev, tl__spool_t* p) {
  tl__dblock_t* list = NULL;
  pthread_mutex_lock(&p->mu);
  for (tl__dblock_t* b = p->pending; b; b = b->next) b->stuck = 0;
  tl__reap(p);
  for (int c = 0; c < TL__NCLS; c++) {
    while (p->free[c]) {
      tl__dblock_t* b = p->free[c];
      p->free[c] = b->next;
      b->next = list;
      list = b;
      p->cached_bytes -= b->cap;
      p->cached_blocks--;
      p->device_frees++;
    }
  }
  pthread_mutex_unlock(&p->mu);
  int first = 0;
  while (list) {
    tl__dblock_t* b = list;
    list = b->next;
    int rc = dev->api->mem_free(dev->ordinal, b->pub.ptr);
    if (rc && !first) first = TL__DEV_ERR(dev, "cudaFree", rc);
    free(b);
  }
  return first;
}

int tl_device_empty_cache(tl_device_t* dev) {
  tl__clear_detail();
  if (!dev) return tl__fail(TL_EINVAL, "tl_device_empty_cache: NULL device");
  int first = tl_device_sync(dev);
  pthread_mutex_lock(&dev->mu);
  tl_stream_t* s = dev->all_streams;
  pthread_mutex_unlock(&dev->mu);
  for (; s; s = s->all_next) {
    tl__spool_t* p = atomic_load_explicit(&s->pool, memory_order_acquire);
    if (!p) continue;
    int err = tl__spool_release(dev, p);
    if (err && !first) first = err;
  }
  return first;
}

int tl_dbuf_alloc(tl_stream_t* s, size_t size, tl_dbuf_t** out) {
  tl__detail[0] = '\0';
  if (!s || !out) return tl__fail(TL_EINVAL, "tl_dbuf_alloc: NULL argument");
  *out = NULL;
  if (size == 0) return tl__fail(TL_EINVAL, "tl_dbuf_alloc: size 0");
  tl__spool_t* p = tl__spool(s);
  if (!p) return tl__fail(TL_ENOMEM, "tl_dbuf_alloc: a stream cache");
  size_t cap;
  int cls = tl__class(size, &cap);
  pthread_mutex_lock(&p->mu);
  tl__dblock_t* b = p->free[cls];
  if (!b && p->pending) {
    tl__reap(p);
    b = p->free[cls];
  }
  if (b) {
    p->free[cls] = b->next;
    tl__account_alloc(p, b, 1);
    pthread_mutex_unlock(&p->mu);
    b->pub.size = size;
    *out = &b->pub;
    return 0;
  }
  pthread_mutex_unlock(&p->mu);

  tl_device_t* dev = s->dev;
  b = calloc(1, sizeof *b);
  if (!b) return tl__fail(TL_ENOMEM, "tl_dbuf_alloc: a block record");
  int rc = dev->api->mem_alloc(dev->ordinal, cap, &b->pub.ptr);
  int retried = 0;
  if (rc == TL__CUDA_MEMORY_ALLOCATION) {
    /* out of memory: give the cache back (after the device finished with it) and retry once */
    retried = 1;
    tl_device_empty_cache(dev);
    rc = dev->api->mem_alloc(dev->ordinal, cap, &b->pub.ptr);
  }
  if (rc) {
    free(b);
    int err = TL__DEV_ERR(dev, "cudaMalloc", rc);
    if (err == TL_ENOMEM) {
      char d[320];
      snprintf(d, sizeof d, "%s", tl_err_detail());
      tl_dmem_stats_t st;
      tl_device_mem_stats(dev, &st);
      err = tl__fail(TL_ENOMEM, "%s: %zu bytes (class %zu) after emptying the cache: %zu bytes "
                     "in use in %zu blocks, %zu cached (%s)", dev->name, size, cap,
                     st.bytes_in_use, st.blocks_in_use, st.bytes_cached, d);
    }
    return err;
  }
  b->pub.size = size;
  b->pub.device = dev;
  b->cap = cap;
  b->cls = cls;
  b->stream = s;
  pthread_mutex_lock(&p->mu);
  p->device_allocs++;
  p->oom_retries += retried;
  tl__account_alloc(p, b, 0);
  pthread_mutex_unlock(&p->mu);
  *out = &b->pub;
  return 0;
}

tl_stream_t* tl_dbuf_stream(const tl_dbuf_t* b) {
  return b ? ((const tl__dblock_t*)b)->stream : NULL;
}

int tl_dbuf_record_stream(tl_dbuf_t* pub, tl_stream_t* s) {
  tl__clear_detail();
  if (!pub || !s) return tl__fail(TL_EINVAL, "tl_dbuf_record_stream: NULL argument");
  tl__dblock_t* b = (tl__dblock_t*)pub;
  if (s->dev != pub->device)
    return tl__fail(TL_EINVAL, "tl_dbuf_record_stream: a block of %s used on a stream of %s",
                    pub->device->name, s->dev->name);
  if (s == b->stream) return 0;
  tl__spool_t* p = atomic_load_explicit(&b->stream->pool, memory_order_acquire);
  int err = 0;
  pthread_mutex_lock(&p->mu);
  int known = 0;
  for (int i = 0; i < b->nuses; i++) known |= b->uses[i] == s;
  if (!known) {
    if (b->nuses == TL__MAX_USES)
      err = tl__fail(TL_ENOMEM, "tl_dbuf_record_stream: a block used on more than %d other "
                     "streams; synchronise some of them and allocate anew", TL__MAX_USES);
    else b->uses[b->nuses++] = s;
  }
  pthread_mutex_unlock(&p->mu);
  return err;
}

int tl_dbuf_record_handle(tl_dbuf_t* pub, void* handle) {
  tl__clear_detail();
  if (!pub) return tl__fail(TL_EINVAL, "tl_dbuf_record_handle: NULL block");
  tl__dblock_t* b = (tl__dblock_t*)pub;
  if (handle == tl_stream_handle(b->stream)) return 0;
  tl__spool_t* p = atomic_load_explicit(&b->stream->pool, memory_order_acquire);
  int err = 0;
  pthread_mutex_lock(&p->mu);
  int known = 0;
  for (int i = 0; i < b->nforeign; i++) known |= b->foreign[i] == handle;
  if (!known) {
    if (b->nforeign == TL__MAX_USES)
      err = tl__fail(TL_ENOMEM, "tl_dbuf_record_handle: a block used on more than %d streams "
                     "of other libraries; allocate anew", TL__MAX_USES);
    else b->foreign[b->nforeign++] = handle;
  }
  pthread_mutex_unlock(&p->mu);
  return err;
}

int tl_dbuf_free(tl_dbuf_t* pub) {
  if (!pub) return 0;
  tl__detail[0] = '\0';
  tl__dblock_t* b = (tl__dblock_t*)pub;
  tl__spool_t* p = atomic_load_explicit(&b->stream->pool, memory_order_acquire);
  pthread_mutex_lock(&p->mu);
  int nuses = b->nuses, nforeign = b->nforeign;
  tl_stream_t* uses[TL__MAX_USES];
  void* foreign[TL__MAX_USES];
  memcpy(uses, b->uses, sizeof uses);
  memcpy(foreign, b->foreign, sizeof foreign);
  pthread_mutex_unlock(&p->mu);
  int first = 0;
  b->nevs = 0;
  for (int i = 0; i < nuses + nforeign; i++) {
    tl_event_t* e;
    int err = tl_event_init(pub->device, 0, &e);
    if (!err) {
      err = i < nuses ? tl_event_record(e, uses[i])
                      : tl_event_record_on(e, pub->device, foreign[i - nuses]);
      if (err) tl_event_close(e);
      else b->evs[b->nevs++] = e;
    }
    if (err && !first) first = err;
  }
  nuses += nforeign;
  pthread_mutex_lock(&p->mu);
  p->in_use_bytes -= b->cap;
  p->in_use_blocks--;
  p->cached_bytes += b->cap;
  p->cached_blocks++;
  if (nuses == 0) {
    b->next = p->free[b->cls];
    p->free[b->cls] = b;
  } else {
    /* With a failed record (the device is failing) another user may still be running: only
     * empty_cache's device sync makes the block free again. */
    b->stuck = first != 0;
    b->next = p->pending;
    p->pending = b;
  }
  pthread_mutex_unlock(&p->mu);
  return first;
}

void tl__spool_add_stats(tl__spool_t* p, tl_dmem_stats_t* out) {
  pthread_mutex_lock(&p->mu);
  out->bytes_in_use += p->in_use_bytes;
  out->blocks_in_use += p->in_use_blocks;
  out->bytes_cached += p->cached_bytes;
  out->blocks_cached += p->cached_blocks;
  out->peak_bytes_in_use += p->peak;
  out->allocs += p->allocs;
  out->cache_hits += p->hits;
  out->device_allocs += p->device_allocs;
  out->device_frees += p->device_frees;
  out->oom_retries += p->oom_retries;
  pthread_mutex_unlock(&p->mu);
}

int tl_device_mem_stats(tl_device_t* dev, tl_dmem_stats_t* out) {
  if (!dev || !out) return tl__fail(TL_EINVAL, "tl_device_mem_stats: NULL argument");
  memset(out, 0, sizeof *out);
  pthread_mutex_lock(&dev->mu);
  tl_stream_t* s = dev->all_streams;
  pthread_mutex_unlock(&dev->mu);
  for (; s; s = s->all_next) {
    tl__spool_t* p = atomic_load_explicit(&s->pool, memory_order_acquire);
    if (p) tl__spool_add_stats(p, out);
  }
  return 0;
}
