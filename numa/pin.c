/* numa/pin.c: pinning threads to plan slots.
 *
 * CPU affinity goes through pthread_setaffinity_np on the calling thread; memory placement is a
 * per-thread MPOL_PREFERRED policy on the slot's node (preferred, not bound: a full node spills
 * to the others instead of failing allocations). A plan of another machine (XML, synthetic)
 * is refused rather than silently applied to this one. */
#include <errno.h>
#include <numa.h>
#include <numaif.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>

#include "numa/internal.h"
#include "numa/plan.h"

static int tl__bitmap_to_cpuset(hwloc_const_bitmap_t b, cpu_set_t* set) {
  CPU_ZERO(set);
  int n = 0;
  int i;
  hwloc_bitmap_foreach_begin(i, b) {
    if (i >= CPU_SETSIZE) return -1;
    CPU_SET(i, set);
    n++;
  }
  hwloc_bitmap_foreach_end();
  return n;
}

/* tid 0: the calling thread. */
static int tl__set_affinity_of(int tid, hwloc_const_bitmap_t pus) {
  cpu_set_t set;
  char want[128];
  hwloc_bitmap_list_snprintf(want, sizeof want, pus);
  if (tl__bitmap_to_cpuset(pus, &set) <= 0)
    return tl__fail(TL_EINVAL, "cannot pin to PUs \"%s\" (empty, or beyond CPU_SETSIZE)", want);
  int rc = tid ? (sched_setaffinity(tid, sizeof set, &set) == 0 ? 0 : errno)
               : pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  if (rc == ESRCH) return tl__fail(TL_EINVAL, "no thread with id %d", tid);
  if (rc != 0)
    return tl__fail(tl_translate_sys_error(rc),
                    "the kernel refused CPU affinity \"%s\": %s (has the cgroup, taskset or "
                    "SLURM binding changed since the topology was loaded?)",
                    want, strerror(rc));
  return 0;
}

static int tl__set_affinity(hwloc_const_bitmap_t pus) { return tl__set_affinity_of(0, pus); }

/* Prefers memory from `node` for the calling thread (-1: back to local allocation). Returns 0,
 * or fills why and returns -1. Single-node machines and kernels without NUMA are a no-op. */
static int tl__set_mempolicy(int node, char* why, size_t cap) {
  if (numa_available() < 0) {
    if (node >= 0) snprintf(why, cap, "memory policy: the kernel has no NUMA support");
    return node >= 0 ? -1 : 0;
  }
  long rc;
  if (node < 0) {
    rc = set_mempolicy(MPOL_DEFAULT, NULL, 0);
  } else {
    unsigned long mask[16] = {0};
    if (node >= (int)(sizeof mask * 8)) {
      snprintf(why, cap, "memory policy: node %d is beyond the supported range", node);
      return -1;
    }
    mask[node / (8 * sizeof(unsigned long))] |= 1UL << (node % (8 * sizeof(unsigned long)));
    rc = set_mempolicy(MPOL_PREFERRED, mask, sizeof mask * 8);
  }
  if (rc != 0) {
    snprintf(why, cap, "memory policy for node %d refused: %s", node, strerror(errno));
    return -1;
  }
  return 0;
}

/* tid 0: the calling thread (CPU and memory); else that thread (CPU only). */
static int tl__pin(const tl_plan_t* plan, int id, int tid, tl_pin_result_t* out) {
  tl__clear_detail();
  tl_pin_result_t local;
  if (!out) out = &local;
  memset(out, 0, sizeof *out);
  out->numa_node = -1;
  hwloc_const_bitmap_t pus;
  int this_system;
  int err = tl__plan_slot_pus(plan, id, &pus, &this_system);
  if (err) return err;
  if (!this_system)
    return tl__fail(TL_EINVAL, "this plan was made from a recorded or synthetic topology, not this "
                               "machine: make one from this machine's topology to pin threads");
  if ((err = tl__set_affinity_of(tid, pus))) return err;
  hwloc_bitmap_list_snprintf(out->cpus, sizeof out->cpus, pus);
  tl_plan_slot_t s;
  tl_plan_slot(plan, id, &s);
  if (s.numa_node >= 0 && tid != 0)
    snprintf(out->refused, sizeof out->refused, "memory policy for node %d: only a thread itself "
             "can set it (pin from inside the thread for NUMA-local memory)", s.numa_node);
  else if (s.numa_node >= 0 && tl__set_mempolicy(s.numa_node, out->refused, sizeof out->refused) == 0)
    out->numa_node = s.numa_node;
  return 0;
}

int tl_pin_self(const tl_plan_t* plan, int id, tl_pin_result_t* out) {
  return tl__pin(plan, id, 0, out);
}

int tl_pin_tid(const tl_plan_t* plan, int id, int tid, tl_pin_result_t* out) {
  if (tid <= 0) return tl__fail(TL_EINVAL, "tl_pin_tid: thread id %d", tid);
  return tl__pin(plan, id, tid, out);
}

int tl_pin_current(char* buf, size_t cap) {
  tl__clear_detail();
  if (!buf || cap == 0) return tl__fail(TL_EINVAL, "tl_pin_current: NULL buffer");
  cpu_set_t set;
  int rc = pthread_getaffinity_np(pthread_self(), sizeof set, &set);
  if (rc != 0) return tl__fail(tl_translate_sys_error(rc), "pthread_getaffinity_np: %s", strerror(rc));
  hwloc_bitmap_t b = hwloc_bitmap_alloc();
  if (!b) return tl__fail(TL_ENOMEM, "tl_pin_current");
  for (int i = 0; i < CPU_SETSIZE; i++)
    if (CPU_ISSET(i, &set)) hwloc_bitmap_set(b, (unsigned)i);
  int n = hwloc_bitmap_list_snprintf(buf, cap, b);
  hwloc_bitmap_free(b);
  if (n < 0 || (size_t)n >= cap) return tl__fail(TL_ERANGE, "tl_pin_current: %d bytes needed", n + 1);
  return 0;
}

int tl_pin_set(const char* cpus, int numa_node) {
  tl__clear_detail();
  if (!cpus) return tl__fail(TL_EINVAL, "tl_pin_set: NULL cpus");
  hwloc_bitmap_t b = hwloc_bitmap_alloc();
  if (!b) return tl__fail(TL_ENOMEM, "tl_pin_set");
  int err = 0;
  if (hwloc_bitmap_list_sscanf(b, cpus) != 0 || hwloc_bitmap_iszero(b))
    err = tl__fail(TL_EINVAL, "cannot parse cpus \"%s\" (write e.g. \"0-7,16\")", cpus);
  if (!err) err = tl__set_affinity(b);
  hwloc_bitmap_free(b);
  if (err) return err;
  char why[160];
  if (tl__set_mempolicy(numa_node, why, sizeof why) != 0) return tl__fail(TL_EPERM, "%s", why);
  return 0;
}
