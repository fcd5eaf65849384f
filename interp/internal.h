/* interp/internal.h: what the launcher's files share. Not installed; nothing here is API. */
#ifndef THREADLOOM_INTERP_INTERNAL_H
#define THREADLOOM_INTERP_INTERNAL_H

#include <stddef.h>

/* What tl__interp_place() did, for the start-up report and the environment. */
typedef struct {
  int allowed_pus;    /* PUs this process may run on (its affinity when the launcher started) */
  int pinned;         /* 1: the main thread was pinned to the plan's main slot */
  char main_cpus[64]; /* the PUs the main thread runs on when pinned, "" otherwise */
} tl__interp_place_t;

/* Loads this machine's topology, plans with the defaults (restricted to the launcher's starting
 * affinity, so `taskset` is honoured) and, with pin = 1, pins the calling (main) thread to the
 * plan's main slot. From then on threads and exec'd programs started by a thread that still has
 * the main slot's affinity get the whole starting affinity back (see interp/pin.c), so thread
 * pools, OpenMP and subprocesses are not squeezed onto the main thread's core. Failures print
 * one line on stderr and leave the thread unpinned; they are never fatal. Must run before any
 * other thread starts. */
void tl__interp_place(int pin, tl__interp_place_t* out);

#endif /* THREADLOOM_INTERP_INTERNAL_H */
