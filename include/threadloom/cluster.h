/* threadloom/cluster.h: SLURM hostlists.
 *
 * SLURM names the nodes of a job with a compressed host list (SLURM_JOB_NODELIST), e.g.
 * "gpu-[001-004,7],login.example-1". tl_hostlist_expand turns one into the host names, in the
 * order `scontrol show hostnames` prints them. The rest of the cluster part (SLURM environment,
 * rendezvous, torchrun variables) is in python/threadloom/cluster.py; see cluster/README.md.
 *
 * Thread safety: the default of common.h (any thread; the calls keep no shared state). */
#ifndef THREADLOOM_CLUSTER_H
#define THREADLOOM_CLUSTER_H

#include <stddef.h>

#include "threadloom/common.h"

TL_BEGIN_DECLS

/* The most host names one expansion may produce; more fail with TL_ERANGE. */
#define TL_HOSTLIST_MAX_HOSTS (1u << 20)
/* The most bytes (names and terminators) one expansion may produce; more fail with TL_ERANGE. */
#define TL_HOSTLIST_MAX_BYTES ((size_t)64 << 20)
/* The longest host name one expansion may produce; longer fails with TL_EINVAL. */
#define TL_HOSTLIST_MAX_NAME 1024

/* Expands the host list `list` into *out, an array of *n NUL-terminated names.
 *
 * Syntax (that of `scontrol show hostnames`): names separated by commas or whitespace (empty
 * entries are skipped); in a name, bracket groups "[r,r,...]" where each r is "N" or "LO-HI"
 * (decimal digits, LO <= HI), expanded in order; a number is zero-padded to the number of digits
 * LO is written with ("[008-010]" -> 008 009 010, "[8-10]" -> 8 9 10). Several groups in one
 * name multiply, the leftmost varying slowest ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2). Names
 * may contain any other character (dashes, dots, underscores). Duplicates are kept.
 * Departures from scontrol 22.05: text after the last "]" is allowed ("n[1-2]-ib" -> n1-ib
 * n2-ib; scontrol rejects it), and inputs scontrol reads in surprising ways are rejected
 * (a '[' without ']' or a ']' without '[', a space inside brackets, "LO-" without HI).
 *
 * Returns 0, or
 *   TL_EINVAL  list is NULL, or malformed; the detail names the position (0-based byte offset)
 *              and what was expected there;
 *   TL_ERANGE  the expansion has more than TL_HOSTLIST_MAX_HOSTS names or TL_HOSTLIST_MAX_BYTES
 *              bytes;
 *   TL_ENOMEM  out of memory.
 * On success the caller owns *out and frees it with tl_hostlist_free(*out, *n); an empty list
 * gives *n == 0 and *out == NULL. On failure *out is NULL and *n is 0. */
TL_EXTERN int tl_hostlist_expand(const char* list, char*** out, size_t* n);

/* Frees an array returned by tl_hostlist_expand (NULL is allowed). */
TL_EXTERN void tl_hostlist_free(char** hosts, size_t n);

TL_END_DECLS

#endif /* THREADLOOM_CLUSTER_H */
