/* tests/c/runner.c: runs the C tests, each in a forked child with a timeout (after libuv).
 *
 *   tl-tests            run every test, print a summary, exit 0 when none failed
 *   tl-tests NAME       run one test (in a child), exit 0 pass, 77 skip, 1 fail
 *   tl-tests --list     print the names
 *
 * A child that crashes, aborts on a failed assertion or outlives its timeout (killed with
 * SIGKILL) fails that test only. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "runner.h"
#include "task.h"

#define TEST_ENTRY(name, timeout) TEST_IMPL(name);
#define HELPER_ENTRY(name, timeout) TEST_IMPL(name);
#include "test-list.h"
#undef TEST_ENTRY
#undef HELPER_ENTRY

typedef struct {
  const char* name;   /* test name */
  int (*fn)(void);    /* the test body */
  int timeout_ms;     /* killed after this */
  int is_helper;      /* run only on request, never in the full list */
} test_entry_t;

static const test_entry_t tests[] = {
#define TEST_ENTRY(name, timeout) {#name, run_test_##name, timeout, 0},
#define HELPER_ENTRY(name, timeout) {#name, run_test_##name, timeout, 1},
#include "test-list.h"
#undef TEST_ENTRY
#undef HELPER_ENTRY
};
static const size_t ntests = sizeof tests / sizeof tests[0];

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char* run_status_name(run_status_t s) {
  switch (s) {
    case RUN_PASS: return "ok";
    case RUN_SKIP: return "skip";
    case RUN_FAIL: return "FAIL";
    case RUN_CRASH: return "CRASH";
    case RUN_TIMEOUT: return "TIMEOUT";
  }
  return "?";
}

run_status_t run_in_child(const char* name) {
  const test_entry_t* t = NULL;
  for (size_t i = 0; i < ntests; i++)
    if (strcmp(tests[i].name, name) == 0) t = &tests[i];
  if (!t) {
    fprintf(stderr, "no test named %s (tl-tests --list)\n", name);
    return RUN_FAIL;
  }
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) {
    perror("fork");
    return RUN_FAIL;
  }
  if (pid == 0) {
    alarm((unsigned)(t->timeout_ms / 1000) + 5); /* backstop should the parent die */
    int rc = t->fn();
    /* exit(), not _exit(): the sanitizers report leaks and races from their exit handlers and
     * then change the exit status, which fails the test. */
    exit(rc == 0 ? 0 : rc == TEST_SKIP ? TEST_SKIP : 1);
  }
  int64_t deadline = now_ms() + t->timeout_ms;
  int status = 0;
  for (;;) {
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) {
      perror("waitpid");
      return RUN_FAIL;
    }
    if (now_ms() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      fprintf(stderr, "%s: killed after %d ms\n", name, t->timeout_ms);
      return RUN_TIMEOUT;
    }
    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  if (WIFSIGNALED(status)) {
    fprintf(stderr, "%s: died of signal %d (%s)\n", name, WTERMSIG(status), strsignal(WTERMSIG(status)));
    return RUN_CRASH;
  }
  int code = WEXITSTATUS(status);
  return code == 0 ? RUN_PASS : code == TEST_SKIP ? RUN_SKIP : RUN_FAIL;
}

int main(int argc, char** argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc == 2 && strcmp(argv[1], "--list") == 0) {
    for (size_t i = 0; i < ntests; i++)
      if (!tests[i].is_helper) printf("%s\n", tests[i].name);
    return 0;
  }
  if (argc == 2) {
    run_status_t s = run_in_child(argv[1]);
    printf("%s %s\n", run_status_name(s), argv[1]);
    return s == RUN_PASS ? 0 : s == RUN_SKIP ? TEST_SKIP : 1;
  }
  int pass = 0, fail = 0, skip = 0;
  for (size_t i = 0; i < ntests; i++) {
    if (tests[i].is_helper) continue;
    run_status_t s = run_in_child(tests[i].name);
    printf("%-7s %s\n", run_status_name(s), tests[i].name);
    if (s == RUN_PASS) pass++;
    else if (s == RUN_SKIP) skip++;
    else fail++;
  }
  printf("%d passed, %d failed, %d skipped\n", pass, fail, skip);
  return fail == 0 ? 0 : 1;
}
