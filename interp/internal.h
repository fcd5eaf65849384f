/* interp/internal.h: what the launcher's files share. Not installed; nothing here is API. */
#ifndef THREADLOOM_INTERP_INTERNAL_H
#define THREADLOOM_INTERP_INTERNAL_H

#include <stddef.h>

#include <pthread.h>

#include "threadloom/numa.h"

/* Placing the main thread, in two steps so the topology load (the expensive part) overlaps the
 * interpreter's start-up: tl__interp_place() starts it on a planning thread, and
 * tl__interp_pin_main() waits for it and pins. Only the main thread touches this object, except
 * the planning thread, which writes plan/err/what/detail/cpus before it is joined. */
typedef struct {
  int allowed_pus;     /* PUs this process may run on (its affinity when the launcher started) */
  int pinned;          /* 1: the main thread was pinned to the plan's main slot */
  char main_cpus[64];  /* the PUs the main thread runs on when pinned, "" otherwise */
  int want_pin;        /* 1: tl__interp_pin_main() has work to do */
  int planning;        /* 1: `planner` runs and must be joined */
  pthread_t planner;   /* the planning thread */
  tl_plan_t* plan;     /* the plan it made, NULL on failure */
  int err;             /* 0 or the TL_E* code of the failure */
  const char* what;    /* the step that failed (static text) */
  char detail[256];    /* tl_err_detail() of the failure, copied off the planning thread */
  char cpus[4096];     /* the starting affinity as a list, the plan's restriction */
  char cache_path[512]; /* the slot cache file for this boot/affinity/GPU set, "" if none */
  int cached;          /* 1: the main slot came from the cache; no planning thread ran */
  char cached_cpus[64]; /* the cached slot's PUs */
  int cached_node;     /* the cached slot's NUMA node, -1 unknown */
} tl__interp_place_t;

/* Records the starting affinity and, with pin = 1, starts loading the topology and planning on
 * a thread of its own (the plan is restricted to the starting affinity, so `taskset` is
 * honoured). Must run before any other thread starts. */
void tl__interp_place(int pin, tl__interp_place_t* p);

/* Waits for the plan and pins the calling (main) thread to its main slot. From then on threads
 * and programs started by a thread that still has the main slot's affinity get the whole
 * starting affinity back (see interp/pin.c), so thread pools, OpenMP and subprocesses are not
 * squeezed onto the main thread's core. Failures print one line on stderr and leave the thread
 * unpinned; they are never fatal. Call before user code runs; no-op without a pin request. */
void tl__interp_pin_main(tl__interp_place_t* p);

#endif /* THREADLOOM_INTERP_INTERNAL_H */
