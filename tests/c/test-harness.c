/* tests/c/test-harness.c: the harness checks itself: a hanging test is killed and reported as
 * a timeout, a crashing one as a crash, so neither can pass by accident. */
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include "runner.h"
#include "task.h"

TEST_IMPL(helper_hang) {
  for (;;) pause();
  return 0;
}

TEST_IMPL(helper_crash) {
  raise(SIGABRT); /* not SIGSEGV: the sanitizers catch that and exit with a status instead */
  return 0;
}

TEST_IMPL(harness_reports_timeout) {
  ASSERT_EQ(run_in_child("helper_hang"), RUN_TIMEOUT);
  return 0;
}

TEST_IMPL(harness_reports_crash) {
  ASSERT_EQ(run_in_child("helper_crash"), RUN_CRASH);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// The sanitizer builds must fail a test that leaks or races: proven here with a deliberate
// leak (ASan/LSan build) and a deliberate data race (TSan build).
// ---------------------------------------------------------------------------------------------

#if defined(__SANITIZE_ADDRESS__)
#define TL_TEST_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define TL_TEST_TSAN 1
#endif

static void* volatile leak_sink;

TEST_IMPL(helper_leak) {
  leak_sink = malloc(4096);
  leak_sink = NULL; /* lost */
  return 0;
}

static int race_counter; /* deliberately unsynchronised */
static pthread_barrier_t race_barrier;

static void* race_worker(void* arg) {
  (void)arg;
  pthread_barrier_wait(&race_barrier);
  for (int i = 0; i < 1000; i++) race_counter++;
  return NULL;
}

TEST_IMPL(helper_race) {
  pthread_t a, b;
  pthread_barrier_init(&race_barrier, NULL, 2);
  pthread_create(&a, NULL, race_worker, NULL);
  pthread_create(&b, NULL, race_worker, NULL);
  pthread_join(a, NULL);
  pthread_join(b, NULL);
  return 0;
}

TEST_IMPL(harness_catches_leak) {
#ifndef TL_TEST_ASAN
  SKIP("only meaningful in the AddressSanitizer build (make test-asan)");
#else
  ASSERT(run_in_child("helper_leak") != RUN_PASS);
  return 0;
#endif
}

TEST_IMPL(harness_catches_race) {
#ifndef TL_TEST_TSAN
  SKIP("only meaningful in the ThreadSanitizer build (make test-tsan)");
#else
  ASSERT(run_in_child("helper_race") != RUN_PASS);
  return 0;
#endif
}
