/* numa/plan.h: what pin.c needs from a plan. */
#ifndef THREADLOOM_NUMA_PLAN_H
#define THREADLOOM_NUMA_PLAN_H

#include <hwloc.h>

#include "threadloom/numa.h"

/* The PUs of slot `id` (owned by the plan) and whether the plan is of this machine. */
int tl__plan_slot_pus(const tl_plan_t* plan, int id, hwloc_const_bitmap_t* pus, int* this_system);

#endif /* THREADLOOM_NUMA_PLAN_H */
