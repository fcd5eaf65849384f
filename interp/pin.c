/* interp/pin.c: pinning the launcher's main thread, without pinning everything it starts.
 *
 * The placement plan gives the main thread a core of its own (or one shared with I/O threads).
 * Linux copies a thread's CPU affinity and memory policy into every thread it creates and every
 * program it executes, so a pinned main thread would squeeze a ThreadPoolExecutor, OpenMP's
 * team or `make -j` run through subprocess onto its one core. The launcher therefore interposes
 * three libc entry points (the executable's definitions win over libc's for libpython and for
 * every library loaded later, as with LD_PRELOAD):
 *
 *   pthread_create  the new thread starts in a trampoline that, if it still has the main slot's
 *                   affinity (it was inherited, not chosen), takes back the affinity the process
 *                   started with and the default memory policy; threads that pin themselves
 *                   (threadloom's workers) pin after that, so they are unaffected;
 *   execve, execv   the same reset just before a program replaces the process (what
 *                   subprocess's fork path and os.exec* call; it runs in a vfork child, so
 *                   only syscalls);
 *   posix_spawn, posix_spawnp, system
 *                   the child is created inside libc, out of reach, and inherits the calling
 *                   thread's settings at that moment: a caller with the main slot's affinity
 *                   takes the start-up affinity and default memory policy for the duration of
 *                   the call and gets its own back afterwards (subprocess uses posix_spawn for
 *                   an executable given by path; glibc's system() spawns internally).
 *
 * Not covered: programs started by other libc entry points (execvpe, fexecve, popen) inherit
 * the main thread's core; `threadloom run --no-pin` avoids that.
 *
 * The starting affinity is also exported as THREADLOOM_START_CPUS (tl__export_start_set), so
 * that threadloom's Python side counts the process's CPUs, not the pinned main thread's.
 *
 * The main slot is cached per boot: loading the topology (hwloc reads /sys, PCI devices
 * included) cost most of the launcher's start-up overhead, and the answer only changes with the
 * machine (boot id), the starting affinity, CUDA_VISIBLE_DEVICES and the library versions, which
 * together key the cache file ($THREADLOOM_CACHE or ~/.cache/threadloom, launcher/ directory).
 * A missing or unreadable cache falls back to planning; THREADLOOM_NO_SLOT_CACHE=1 disables it.
 *
 * State: tl__start_set is written by tl__interp_place() before any other thread exists;
 * tl__main_set, tl__active and tl__reset_mempolicy by tl__interp_pin_main() on the main thread
 * after the planning thread was joined and before user code can start a thread. The interposers
 * only read them, so they need no synchronisation. */
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "interp/internal.h"
#include "threadloom/error.h"
#include "threadloom/numa.h"
#include "threadloom/threadloom.h"

typedef int (*tl__create_fn)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
typedef int (*tl__execve_fn)(const char*, char* const[], char* const[]);
typedef int (*tl__execv_fn)(const char*, char* const[]);
typedef int (*tl__spawn_fn)(pid_t*, const char*, const posix_spawn_file_actions_t*,
                            const posix_spawnattr_t*, char* const[], char* const[]);
typedef int (*tl__system_fn)(const char*);

static cpu_set_t tl__start_set; /* the affinity the process started with */
static cpu_set_t tl__main_set;  /* the main slot's PUs */
static int tl__active;          /* 1 once the main thread is pinned */
static int tl__reset_mempolicy; /* 1 when pinning set a memory policy to undo */
static tl__create_fn tl__real_create;
static tl__execve_fn tl__real_execve;
static tl__execv_fn tl__real_execv;
static tl__spawn_fn tl__real_spawn;
static tl__spawn_fn tl__real_spawnp;
static tl__system_fn tl__real_system;
static pthread_once_t tl__resolve_once = PTHREAD_ONCE_INIT;

/* The build hides symbols by default; the interposers must be seen by the dynamic linker. */
#define TL__INTERPOSE __attribute__((visibility("default")))

// ---------------------------------------------------------------------------------------------
// The interposed entry points
// ---------------------------------------------------------------------------------------------

/* dlsym returns an object pointer; copying it is the POSIX way to get a function pointer. */
static void tl__resolve(void) {
  void* p = dlsym(RTLD_NEXT, "pthread_create");
  memcpy(&tl__real_create, &p, sizeof p);
  p = dlsym(RTLD_NEXT, "execve");
  memcpy(&tl__real_execve, &p, sizeof p);
  p = dlsym(RTLD_NEXT, "execv");
  memcpy(&tl__real_execv, &p, sizeof p);
  p = dlsym(RTLD_NEXT, "posix_spawn");
  memcpy(&tl__real_spawn, &p, sizeof p);
  p = dlsym(RTLD_NEXT, "posix_spawnp");
  memcpy(&tl__real_spawnp, &p, sizeof p);
  p = dlsym(RTLD_NEXT, "system");
  memcpy(&tl__real_system, &p, sizeof p);
}

/* Gives the calling thread the start-up affinity back if it only inherited the main slot's.
 * Syscalls only: it also runs in vfork children. */
static void tl__unpin_inherited(void) {
  cpu_set_t cur;
  if (!tl__active || sched_getaffinity(0, sizeof cur, &cur) != 0) return;
  if (!CPU_EQUAL(&cur, &tl__main_set)) return;
  (void)sched_setaffinity(0, sizeof tl__start_set, &tl__start_set);
  if (tl__reset_mempolicy) (void)syscall(SYS_set_mempolicy, 0 /* MPOL_DEFAULT */, NULL, 0UL);
}

typedef struct {
  void* (*fn)(void*); /* the thread's real start routine */
  void* arg;          /* its argument */
} tl__start_t;

static void* tl__trampoline(void* p) {
  tl__start_t s = *(tl__start_t*)p;
  free(p);
  tl__unpin_inherited();
  return s.fn(s.arg);
}

TL__INTERPOSE int pthread_create(pthread_t* thread, const pthread_attr_t* attr, void* (*fn)(void*), void* arg) {
  pthread_once(&tl__resolve_once, tl__resolve);
  if (!tl__active) return tl__real_create(thread, attr, fn, arg);
  tl__start_t* s = malloc(sizeof *s);
  if (!s) return tl__real_create(thread, attr, fn, arg);
  s->fn = fn;
  s->arg = arg;
  int rc = tl__real_create(thread, attr, tl__trampoline, s);
  if (rc != 0) free(s);
  return rc;
}

/* tl__resolve ran in tl__interp_place(), before any fork: no lazy lookup in a vfork child. */
TL__INTERPOSE int execve(const char* path, char* const argv[], char* const envp[]) {
  tl__unpin_inherited();
  return tl__real_execve(path, argv, envp);
}

TL__INTERPOSE int execv(const char* path, char* const argv[]) {
  tl__unpin_inherited();
  return tl__real_execv(path, argv);
}

/* What a thread with the main slot's settings gives up around a spawn, to get it back. */
typedef struct {
  int swapped;             /* 1: the thread had the main slot's affinity and was reset */
  int mode;                /* its memory policy mode (get_mempolicy) */
  unsigned long nodes[16]; /* and node mask, 1024 nodes */
} tl__saved_t;

static void tl__spawn_begin(tl__saved_t* sv) {
  cpu_set_t cur;
  sv->swapped = 0;
  if (!tl__active || sched_getaffinity(0, sizeof cur, &cur) != 0 || !CPU_EQUAL(&cur, &tl__main_set)) return;
  sv->mode = -1;
  if (tl__reset_mempolicy &&
      syscall(SYS_get_mempolicy, &sv->mode, sv->nodes, 8 * sizeof sv->nodes, NULL, 0UL) != 0)
    sv->mode = -1;
  if (sched_setaffinity(0, sizeof tl__start_set, &tl__start_set) != 0) return;
  if (sv->mode >= 0) (void)syscall(SYS_set_mempolicy, 0 /* MPOL_DEFAULT */, NULL, 0UL);
  sv->swapped = 1;
}

static void tl__spawn_end(const tl__saved_t* sv) {
  if (!sv->swapped) return;
  (void)sched_setaffinity(0, sizeof tl__main_set, &tl__main_set);
  if (sv->mode >= 0) (void)syscall(SYS_set_mempolicy, sv->mode, sv->nodes, 8 * sizeof sv->nodes);
}

TL__INTERPOSE int posix_spawn(pid_t* pid, const char* path, const posix_spawn_file_actions_t* fa,
                              const posix_spawnattr_t* attr, char* const argv[], char* const envp[]) {
  pthread_once(&tl__resolve_once, tl__resolve);
  tl__saved_t sv;
  tl__spawn_begin(&sv);
  int rc = tl__real_spawn(pid, path, fa, attr, argv, envp);
  tl__spawn_end(&sv);
  return rc;
}

TL__INTERPOSE int posix_spawnp(pid_t* pid, const char* file, const posix_spawn_file_actions_t* fa,
                               const posix_spawnattr_t* attr, char* const argv[], char* const envp[]) {
  pthread_once(&tl__resolve_once, tl__resolve);
  tl__saved_t sv;
  tl__spawn_begin(&sv);
  int rc = tl__real_spawnp(pid, file, fa, attr, argv, envp);
  tl__spawn_end(&sv);
  return rc;
}

TL__INTERPOSE int system(const char* command) {
  pthread_once(&tl__resolve_once, tl__resolve);
  tl__saved_t sv;
  tl__spawn_begin(&sv);
  int rc = tl__real_system(command);
  tl__spawn_end(&sv);
  return rc;
}

// ---------------------------------------------------------------------------------------------
// Placing the main thread
// ---------------------------------------------------------------------------------------------

/* "0-3,8" style list of a cpu_set_t (plain comma list: hwloc's parser accepts it). */
static int tl__cpuset_format(const cpu_set_t* set, char* buf, size_t cap) {
  size_t n = 0;
  buf[0] = '\0';
  for (int i = 0; i < CPU_SETSIZE; i++) {
    if (!CPU_ISSET(i, set)) continue;
    int w = snprintf(buf + n, cap - n, "%s%d", n ? "," : "", i);
    if (w < 0 || (size_t)w >= cap - n) return -1;
    n += (size_t)w;
  }
  return 0;
}

/* The GPUs CUDA_VISIBLE_DEVICES leaves visible, -1 when it is unset. The launcher does not start
 * CUDA (that costs from 0.1 s to seconds, before the user's code even runs), so the plan takes
 * that many GPUs in PCI order; only the main slot is used, and it does not depend on the order. */
static int tl__visible_gpus(void) {
  const char* v = getenv("CUDA_VISIBLE_DEVICES");
  if (!v) return -1;
  int n = 0;
  for (const char* p = v; *p;) {
    const char* e = strchr(p, ',');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    if (len == 0 || (len == 2 && strncmp(p, "-1", 2) == 0)) break; /* CUDA stops at -1 */
    n++;
    p += len + (e ? 1 : 0);
    if (!e) break;
  }
  return n;
}

/* The planning thread's work: the topology load (most of the cost: hwloc reads /sys, PCI
 * devices included, for the GPUs' locality) and the plan. Writes only p->plan/err/what, read by
 * tl__interp_pin_main() after pthread_join (which orders the accesses). */
static void* tl__plan_main(void* arg) {
  tl__interp_place_t* p = arg;
  tl_topo_t* topo = NULL;
  tl_plan_spec_t spec;
  tl_topo_summary_t sum;
  int err = tl_topo_init(&topo, NULL);
  if (err) {
    p->what = "loading the topology";
    goto out;
  }
  tl_plan_spec_default(&spec);
  if (p->cpus[0]) spec.cpus = p->cpus;
  spec.gpus = tl__visible_gpus();
  if (tl_topo_summary(topo, &sum) == 0 && spec.gpus > sum.gpus) spec.gpus = sum.gpus;
  err = tl_plan_init(&p->plan, topo, &spec);
  tl_topo_close(topo);
  if (err) p->what = "planning";
out:
  p->err = err;
  if (err) snprintf(p->detail, sizeof p->detail, "%s", tl_err_detail());
  return NULL;
}

// ---------------------------------------------------------------------------------------------
// The main slot cache
// ---------------------------------------------------------------------------------------------

static uint64_t tl__fnv1a(uint64_t h, const char* s) {
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

/* Fills p->cache_path for this boot, affinity, GPU visibility and versions; "" when there is
 * no usable cache directory or the cache is disabled. */
static void tl__cache_path(tl__interp_place_t* p) {
  p->cache_path[0] = '\0';
  const char* off = getenv("THREADLOOM_NO_SLOT_CACHE");
  if (off && *off && strcmp(off, "0") != 0) return;
  char boot[64] = "";
  FILE* f = fopen("/proc/sys/kernel/random/boot_id", "r");
  if (!f) return;
  if (!fgets(boot, sizeof boot, f)) boot[0] = '\0';
  fclose(f);
  if (!boot[0]) return;
  char dir[400];
  const char* base = getenv("THREADLOOM_CACHE");
  const char* xdg = getenv("XDG_CACHE_HOME");
  const char* home = getenv("HOME");
  if (base && *base) snprintf(dir, sizeof dir, "%s/launcher", base);
  else if (xdg && *xdg) snprintf(dir, sizeof dir, "%s/threadloom/launcher", xdg);
  else if (home && *home) snprintf(dir, sizeof dir, "%s/.cache/threadloom/launcher", home);
  else return;
  char vers[64];
  snprintf(vers, sizeof vers, "%s/%x", tl_version_string(), tl_hwloc_version());
  const char* cvd = getenv("CUDA_VISIBLE_DEVICES");
  uint64_t h = 1469598103934665603ull;
  h = tl__fnv1a(h, boot);
  h = tl__fnv1a(h, p->cpus);
  h = tl__fnv1a(h, cvd ? cvd : "<unset>");
  h = tl__fnv1a(h, vers);
  snprintf(p->cache_path, sizeof p->cache_path, "%s/main-slot-%016llx", dir, (unsigned long long)h);
}

static int tl__cache_read(tl__interp_place_t* p) {
  if (!p->cache_path[0]) return 0;
  FILE* f = fopen(p->cache_path, "r");
  if (!f) return 0;
  int ok = fscanf(f, "%63s %d", p->cached_cpus, &p->cached_node) == 2;
  fclose(f);
  return ok;
}

/* Best effort: a failure only means the next start plans again. Written to a temporary name
 * and renamed, so a reader never sees half a line. */
static void tl__cache_write(const tl__interp_place_t* p, const char* cpus, int node) {
  if (!p->cache_path[0]) return;
  char dir[512], tmp[560];
  snprintf(dir, sizeof dir, "%s", p->cache_path);
  char* slash = strrchr(dir, '/');
  if (!slash) return;
  *slash = '\0';
  char* parent = strrchr(dir, '/');
  if (parent) {
    *parent = '\0';
    mkdir(dir, 0755); /* .../threadloom */
    *parent = '/';
  }
  mkdir(dir, 0755);
  snprintf(tmp, sizeof tmp, "%s.%d", p->cache_path, (int)getpid());
  FILE* f = fopen(tmp, "w");
  if (!f) return;
  int ok = fprintf(f, "%s %d\n", cpus, node) > 0;
  ok = fclose(f) == 0 && ok;
  if (!ok || rename(tmp, p->cache_path) != 0) unlink(tmp);
}

/* THREADLOOM_START_CPUS="<pid>:<list>": the affinity the process started with, for threadloom's
 * Python side (python/threadloom/_cpus.py), which would otherwise read the main thread's, and
 * that is the main slot once pinned. The pid makes child processes, which inherit the
 * environment, ignore it. Set before the interpreter starts (os.environ is read then) and
 * before any other thread exists. */
static void tl__export_start_set(const char* cpus) {
  char v[sizeof ((tl__interp_place_t*)0)->cpus + 24];
  if (snprintf(v, sizeof v, "%ld:%s", (long)getpid(), cpus) < (int)sizeof v)
    setenv("THREADLOOM_START_CPUS", v, 1);
}

void tl__interp_place(int pin, tl__interp_place_t* p) {
  memset(p, 0, sizeof *p);
  pthread_once(&tl__resolve_once, tl__resolve);
  CPU_ZERO(&tl__start_set);
  if (sched_getaffinity(0, sizeof tl__start_set, &tl__start_set) != 0) {
    p->allowed_pus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    return;
  }
  p->allowed_pus = CPU_COUNT(&tl__start_set);
  int listed = tl__cpuset_format(&tl__start_set, p->cpus, sizeof p->cpus) == 0;
  if (listed) tl__export_start_set(p->cpus);
  if (!pin) return;
  p->want_pin = 1;
  if (listed) {
    tl__cache_path(p);
    if (tl__cache_read(p)) {
      p->cached = 1;
      return;
    }
  }
  if (pthread_create(&p->planner, NULL, tl__plan_main, p) == 0)
    p->planning = 1;
  else
    tl__plan_main(p);
  p->want_pin = 1;
}

static void tl__say_unpinned(const char* what, int err, const char* detail) {
  fprintf(stderr, "threadloom: the main thread is not pinned: %s failed: %s: %s%s%s (--no-pin silences this)\n",
          what, tl_err_name(err), tl_strerror(err), detail[0] ? ": " : "", detail);
}

void tl__interp_pin_main(tl__interp_place_t* p) {
  if (!p->want_pin) return;
  if (p->planning) pthread_join(p->planner, NULL);
  p->planning = 0;
  p->want_pin = 0;
  tl_pin_result_t res;
  memset(&res, 0, sizeof res);
  res.numa_node = -1;
  if (p->cached) {
    int err = tl_pin_set(p->cached_cpus, p->cached_node);
    if (err) {
      unlink(p->cache_path); /* stale: plan afresh next time */
      tl__say_unpinned("pinning to the cached slot", err, tl_err_detail());
      return;
    }
    snprintf(res.cpus, sizeof res.cpus, "%s", p->cached_cpus);
    res.numa_node = p->cached_node;
  } else {
    if (p->err) {
      tl__say_unpinned(p->what, p->err, p->detail);
      return;
    }
    int id = -1;
    tl_plan_slot_t slot;
    int err = tl_plan_find(p->plan, TL_ROLE_MAIN, -1, 0, &id);
    if (!err) err = tl_plan_slot(p->plan, id, &slot);
    if (!err) err = tl_pin_self(p->plan, id, &res);
    tl_plan_close(p->plan);
    p->plan = NULL;
    if (err) {
      tl__say_unpinned("pinning", err, tl_err_detail());
      return;
    }
    tl__cache_write(p, slot.cpus, slot.numa_node);
  }
  if (sched_getaffinity(0, sizeof tl__main_set, &tl__main_set) != 0) return;
  tl__reset_mempolicy = res.numa_node >= 0;
  /* Nothing to undo in children when the main slot is the whole starting affinity. Written
   * while the main thread is still the only thread running Python (nothing else has started). */
  tl__active = !CPU_EQUAL(&tl__main_set, &tl__start_set);
  p->pinned = 1;
  snprintf(p->main_cpus, sizeof p->main_cpus, "%s", res.cpus);
}
