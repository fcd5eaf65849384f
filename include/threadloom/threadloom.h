/* threadloom/threadloom.h: the one header a C user includes.
 *
 * threadloom is a runtime for driving multi-GPU servers from one free-threaded Python process:
 *   numa/      topology, placement and NUMA-local pinned memory     (threadloom/numa.h,
 *                                                                    threadloom/arena.h)
 *   cudactx/   CUDA discovery and NCCL                            (threadloom/cudactx.h);
 *              devices (cuda or simulated), streams, events, device
 *              memory and pinned staging                            (threadloom/device.h)
 *   scheduler/ pinned work-stealing threads and pipelines      (threadloom/scheduler.h)
 *   ckptio/    checkpoint file writes: buffered, O_DIRECT, io_uring (threadloom/ckptio.h)
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
