/* cudactx/staging.c: pinned staging slots, reused only after their last copy completed.
 *
 * A pool is one block of an arena on the device's NUMA node, page-locked through the device's
 * backend (cudaHostRegister, or the sim's registry of pinned ranges), cut into slots. Each slot
 * owns an event. The reuse race (a producer overwriting a slot while a copy still reads it) is
 * impossible by construction: a slot comes back only through tl_staging_release (or
 * tl_staging_copy_to_device, which calls it), which records the slot's event on the stream of
 * the slot's last work after that work was enqueued; acquire hands out only slots whose event
 * query answered complete (or failed: failed work never reads the slot again). The producer's
 * handle is the only way to write a slot, and it has given the handle back.
 *
 * Invariants: the free stack, the pending FIFO (slots in release order: the oldest completes
 * first on one stream), `out` and `closed` are under `mu`; a slot is in exactly one of free,
 * pending, or held by a producer. Acquire waits for the oldest pending slot's event without the
 * lock (the slot stays pending; whoever next looks under the lock moves it), or on `cv` when
 * every slot is held (release signals). The lock is never held across a blocking call; event
 * queries under it do not block. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cudactx/internal.h"
#include "threadloom/arena.h"

_Atomic int tl__staging_poison_byte = -1;
_Atomic int tl__staging_unsafe = 0;

typedef struct {
  tl_staging_slot_t pub;  /* first: the caller's handle */
  tl_staging_t* pool;
  tl_event_t* ev;         /* recorded after the slot's last work */
  int recorded;           /* pending: ev has a record to wait for (the pool's mu) */
  int held_recorded;      /* the holder recorded ev itself (copy_from_device); holder only */
} tl__slot_t;

struct tl_staging_s {
  tl_device_t* dev;
  tl_arena_t* arena;      /* the NUMA-local memory */
  char* slab;             /* the slots, slot stride apart */
  size_t slab_bytes;
  int nslots;
  tl__slot_t* slots;
  int pinned;
  char pin_detail[192];
  pthread_mutex_t mu;
  pthread_cond_t cv;      /* a slot was released */
  int* free;              /* stack of free slot indices (mu) */
  int nfree;
  int* pending;           /* FIFO ring of released slots (mu) */
  int phead, npending;
  int out;                /* slots held by producers (mu) */
  int closed;             /* close began (mu) */
  uint64_t acquires, waits, wait_ns; /* (mu) */
};

static uint64_t tl__ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Frees what init made so far (or everything, at close): the slots' events, the page-lock,
 * the slab, the arena, the records. Every copy of the slots has completed. */
static void tl__pool_free(tl_staging_t* p) {
  if (p->slots)
    for (int i = 0; i < p->nslots; i++) tl_event_close(p->slots[i].ev);
  if (p->pinned) p->dev->api->host_unregister(p->slab);
  if (p->slab) tl_arena_free(p->arena, p->slab);
  if (p->arena) tl_arena_close(p->arena);
  pthread_mutex_destroy(&p->mu);
  pthread_cond_destroy(&p->cv);
  free(p->slots);
  free(p->free);
  free(p->pending);
  free(p);
}

int tl_staging_init(tl_staging_t** out, const tl_staging_options_t* o) {
  tl__clear_detail();
  if (!out || !o || !o->device) return tl__fail(TL_EINVAL, "tl_staging_init: NULL argument");
  *out = NULL;
  if (o->slot_bytes == 0 || o->slots < 1 || o->slots > 1 << 16)
    return tl__fail(TL_EINVAL, "tl_staging_init: slot_bytes must be > 0 and slots in 1..65536 "
                    "(got %zu, %d)", o->slot_bytes, o->slots);
  tl_device_t* dev = o->device;
  size_t stride = (o->slot_bytes + 4095) & ~(size_t)4095;
  if (stride > ((size_t)1 << 40) / (size_t)o->slots)
    return tl__fail(TL_EINVAL, "tl_staging_init: %d slots of %zu bytes is too much", o->slots,
                    o->slot_bytes);
  tl_staging_t* p = calloc(1, sizeof *p);
  if (!p) return tl__fail(TL_ENOMEM, "tl_staging_init: the pool record");
  p->dev = dev;
  p->nslots = o->slots;
  p->slab_bytes = stride * (size_t)o->slots;
  p->slots = calloc((size_t)o->slots, sizeof *p->slots);
  p->free = calloc((size_t)o->slots, sizeof *p->free);
  p->pending = calloc((size_t)o->slots, sizeof *p->pending);
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->cv, NULL);
  int err = 0;
  if (!p->slots || !p->free || !p->pending) {
    err = tl__fail(TL_ENOMEM, "tl_staging_init: slot records");
    goto fail;
  }
  /* The arena's region: the slab plus one granule for the allocating thread's segments (and as
   * much again for mimalloc's huge-block rounding). Never pinned by the arena itself: the pool
   * page-locks its slab through its own device's backend below. */
  tl_arena_options_t ao = {.numa_node = o->numa_node >= 0 ? o->numa_node : dev->props.numa_node,
                           .size = 2 * p->slab_bytes + TL_ARENA_GRANULE,
                           .pin = TL_ARENA_PIN_NEVER};
  if ((err = tl_arena_init(&p->arena, &ao)) != 0) goto fail;
  void* slab;
  if ((err = tl_arena_alloc(p->arena, p->slab_bytes, 4096, &slab)) != 0) goto fail;
  p->slab = slab;
  int rc = dev->api->host_register(p->slab, p->slab_bytes);
  if (rc) {
    err = TL__DEV_ERR(dev, "cudaHostRegister (staging)", rc);
    goto fail;
  }
  p->pinned = 1;
  snprintf(p->pin_detail, sizeof p->pin_detail, "pinned: %s(%zu bytes) on NUMA node %d",
           dev->kind == TL_DEVICE_SIM ? "sim host_register" : "cudaHostRegister", p->slab_bytes,
           ao.numa_node);
  for (int i = 0; i < p->nslots; i++) {
    tl__slot_t* s = &p->slots[i];
    s->pub.ptr = p->slab + (size_t)i * stride;
    s->pub.size = o->slot_bytes;
    s->pub.index = i;
    s->pool = p;
    if ((err = tl_event_init(dev, 0, &s->ev)) != 0) goto fail;
    p->free[p->nfree++] = p->nslots - 1 - i; /* slot 0 on top */
  }
  *out = p;
  return 0;
fail:;
  char d[400];
  snprintf(d, sizeof d, "%s", tl_err_detail());
  tl__pool_free(p);
  return tl__fail(err, "%s", d);
}

/* Moves the pending slots at the head whose event completed to the free stack (mu held). */
static void tl__collect(tl_staging_t* p) {
  while (p->npending > 0) {
    tl__slot_t* s = &p->slots[p->pending[p->phead]];
    int rc = s->recorded ? s->ev->api->event_query(s->ev->h) : 0;
    if (rc == TL__CUDA_NOT_READY) return;
    s->recorded = 0;
    p->phead = (p->phead + 1) % p->nslots;
    p->npending--;
    p->free[p->nfree++] = s->pub.index;
  }
}

int tl_staging_acquire(tl_staging_t* p, int timeout_ms, tl_staging_slot_t** out) {
  tl__clear_detail();
  if (!p || !out) return tl__fail(TL_EINVAL, "tl_staging_acquire: NULL argument");
  *out = NULL;
  uint64_t t0 = tl__ns(), waited_from = 0;
  uint64_t deadline = timeout_ms < 0 ? UINT64_MAX : t0 + (uint64_t)timeout_ms * 1000000u;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    if (p->closed) {
      pthread_mutex_unlock(&p->mu);
      return tl__fail(TL_ECLOSED, "tl_staging_acquire: the staging pool is closing");
    }
    tl__collect(p);
    if (p->nfree > 0) {
      tl__slot_t* s = &p->slots[p->free[--p->nfree]];
      p->out++;
      p->acquires++;
      if (waited_from) {
        p->waits++;
        p->wait_ns += tl__ns() - waited_from;
      }
      pthread_mutex_unlock(&p->mu);
      int poison = atomic_load_explicit(&tl__staging_poison_byte, memory_order_relaxed);
      if (poison >= 0) memset(s->pub.ptr, poison, s->pub.size);
      *out = &s->pub;
      return 0;
    }
    uint64_t now = tl__ns();
    if (now >= deadline) {
      int held = p->out, pend = p->npending;
      pthread_mutex_unlock(&p->mu);
      return tl__fail(TL_ETIMEDOUT, "tl_staging_acquire: no slot freed within %d ms (%d held by "
                      "producers, %d waiting for their copies)", timeout_ms, held, pend);
    }
    if (!waited_from) waited_from = now;
    int left_ms = deadline == UINT64_MAX ? -1 : (int)((deadline - now + 999999) / 1000000);
    if (p->npending > 0) {
      /* wait for the oldest copy without the lock; the slot stays pending */
      tl_event_t* ev = p->slots[p->pending[p->phead]].ev;
      pthread_mutex_unlock(&p->mu);
      int err = tl_event_wait(ev, left_ms);
      (void)err; /* complete, failed or timed out: the loop looks again */
      pthread_mutex_lock(&p->mu);
    } else if (deadline == UINT64_MAX) {
      pthread_cond_wait(&p->cv, &p->mu);
    } else {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      uint64_t abs = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec + (deadline - now);
      ts.tv_sec = (time_t)(abs / 1000000000u);
      ts.tv_nsec = (long)(abs % 1000000000u);
      pthread_cond_timedwait(&p->cv, &p->mu, &ts);
    }
  }
}

int tl_staging_release(tl_staging_slot_t* slot, tl_stream_t* st) {
  tl__clear_detail();
  if (!slot) return tl__fail(TL_EINVAL, "tl_staging_release: NULL slot");
  tl__slot_t* s = (tl__slot_t*)slot;
  tl_staging_t* p = s->pool;
  int err = 0, rec = s->held_recorded;
  s->held_recorded = 0;
  if (st) {
    err = tl_event_record(s->ev, st);
    if (err) {
      /* The record failed (the device is failing): wait for what the stream has, so the slot
       * is not handed out under a copy that might still run. */
      char d[400];
      snprintf(d, sizeof d, "%s", tl_err_detail());
      tl_stream_sync(st, -1);
      tl__fail(err, "%s", d);
    } else {
      rec = 1;
    }
  }
  if (atomic_load_explicit(&tl__staging_unsafe, memory_order_relaxed)) rec = 0;
  pthread_mutex_lock(&p->mu);
  s->recorded = rec;
  p->out--;
  if (rec) {
    p->pending[(p->phead + p->npending) % p->nslots] = slot->index;
    p->npending++;
  } else {
    p->free[p->nfree++] = slot->index;
  }
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  return err;
}

int tl_staging_copy_to_device(tl_staging_slot_t* slot, void* dst, size_t size, tl_stream_t* st) {
  tl__clear_detail();
  if (!slot || !st) return tl__fail(TL_EINVAL, "tl_staging_copy_to_device: NULL argument");
  if (size > slot->size) {
    tl_staging_release(slot, NULL);
    return tl__fail(TL_EINVAL, "tl_staging_copy_to_device: %zu bytes from a %zu-byte slot",
                    size, slot->size);
  }
  int err = tl_copy_async(st, dst, slot->ptr, size, TL_COPY_H2D);
  if (err) {
    char d[400];
    snprintf(d, sizeof d, "%s", tl_err_detail());
    tl_staging_release(slot, NULL); /* nothing was enqueued: nothing reads the slot */
    return tl__fail(err, "%s", d);
  }
  return tl_staging_release(slot, st);
}

int tl_staging_copy_from_device(tl_staging_slot_t* slot, size_t offset, const void* src,
                                size_t size, tl_stream_t* st) {
  tl__clear_detail();
  if (!slot || !st) return tl__fail(TL_EINVAL, "tl_staging_copy_from_device: NULL argument");
  if (offset > slot->size || size > slot->size - offset)
    return tl__fail(TL_EINVAL, "tl_staging_copy_from_device: %zu bytes at offset %zu of a "
                    "%zu-byte slot", size, offset, slot->size);
  tl__slot_t* s = (tl__slot_t*)slot;
  int err = tl_copy_async(st, (char*)slot->ptr + offset, src, size, TL_COPY_D2H);
  if (!err) err = tl_event_record(s->ev, st);
  if (!err) s->held_recorded = 1; /* a release without a stream still waits for this copy */
  return err;
}

int tl_staging_wait(tl_staging_slot_t* slot, int timeout_ms) {
  if (!slot) return tl__fail(TL_EINVAL, "tl_staging_wait: NULL slot");
  return tl_event_wait(((tl__slot_t*)slot)->ev, timeout_ms);
}

int tl_staging_stats(tl_staging_t* p, tl_staging_stats_t* out) {
  if (!p || !out) return tl__fail(TL_EINVAL, "tl_staging_stats: NULL argument");
  memset(out, 0, sizeof *out);
  pthread_mutex_lock(&p->mu);
  tl__collect(p);
  out->slots = p->nslots;
  out->free = p->nfree;
  out->pending = p->npending;
  out->out = p->out;
  out->acquires = p->acquires;
  out->waits = p->waits;
  out->wait_ns = p->wait_ns;
  pthread_mutex_unlock(&p->mu);
  out->pinned = p->pinned;
  tl__strlcpy(out->pin_detail, p->pin_detail, sizeof out->pin_detail);
  return 0;
}

int tl_staging_close(tl_staging_t* p) {
  if (!p) return 0;
  tl__clear_detail();
  pthread_mutex_lock(&p->mu);
  if (p->out > 0) {
    int held = p->out;
    pthread_mutex_unlock(&p->mu);
    return tl__fail(TL_EBUSY, "tl_staging_close: %d slot(s) are still held by producers: hand "
                    "them back first", held);
  }
  p->closed = 1;
  pthread_mutex_unlock(&p->mu);
  for (int i = 0; i < p->nslots; i++)
    if (p->slots[i].recorded) tl_event_wait(p->slots[i].ev, -1);
  tl__pool_free(p);
  return 0;
}
