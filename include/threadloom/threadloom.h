/* threadloom/threadloom.h: the one header a C user includes.
 *
 * threadloom is a runtime for driving multi-GPU servers from one free-threaded Python process.
 * The parts this header brings in, each with its own header:
 *   core/      the error table, per-thread error detail, versions    (threadloom/error.h,
 *                                                                    threadloom/common.h)
 *   numa/      topology, placement plans, pinning, NUMA-local arenas (threadloom/numa.h,
 *                                                                    threadloom/arena.h)
 *   cudactx/   CUDA discovery and NCCL                            (threadloom/cudactx.h);
 *              devices (cuda or simulated), streams, events, device
 *              memory and pinned staging                            (threadloom/device.h)
 *   scheduler/ pinned work-stealing thread pools and task groups     (threadloom/scheduler.h)
 *   ckptio/    checkpoint file writes: buffered, O_DIRECT, io_uring  (threadloom/ckptio.h)
 *   cluster/   SLURM host-list expansion                             (threadloom/cluster.h)
 * Conventions (see docs/design.md): fallible calls return 0 or a negative TL_E* code
 * (threadloom/error.h); thread-safety and ownership defaults are in threadloom/common.h. */
#ifndef THREADLOOM_THREADLOOM_H
#define THREADLOOM_THREADLOOM_H

#include "threadloom/arena.h"
#include "threadloom/ckptio.h"
#include "threadloom/cluster.h"
#include "threadloom/common.h"
#include "threadloom/cudactx.h"
#include "threadloom/device.h"
#include "threadloom/error.h"
#include "threadloom/numa.h"
#include "threadloom/scheduler.h"

TL_BEGIN_DECLS

/* "0.1.0": the version of the library that is loaded (may differ from TL_VERSION_STRING). */
TL_EXTERN const char* tl_version_string(void);

TL_END_DECLS

#endif /* THREADLOOM_THREADLOOM_H */
