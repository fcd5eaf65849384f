/* tests/c/task.h: the C test harness's assertions (after libuv's test/task.h).
 *
 * Each test is `TEST_IMPL(name) { ...; return 0; }`, listed once in test-list.h. The runner
 * forks a child per test and kills it at its timeout, so a hang or a crash fails one test and
 * never the run. A test that cannot run here (no GPU, say) returns TEST_SKIP with a reason. */
#ifndef THREADLOOM_TEST_TASK_H
#define THREADLOOM_TEST_TASK_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TEST_SKIP 77 /* also ctest's SKIP_RETURN_CODE */

#define TEST_IMPL(name) int run_test_##name(void)

#define TL_FAIL_AT(...)                                                     \
  do {                                                                      \
    fprintf(stderr, "%s:%d: assertion failed: ", __FILE__, __LINE__);       \
    fprintf(stderr, __VA_ARGS__);                                           \
    fprintf(stderr, "\n");                                                  \
    fflush(stderr);                                                         \
    abort();                                                                \
  } while (0)

#define ASSERT(expr)                                 \
  do {                                               \
    if (!(expr)) TL_FAIL_AT("%s", #expr);            \
  } while (0)

#define ASSERT_EQ(a, b)                                                                   \
  do {                                                                                    \
    int64_t a_ = (int64_t)(a), b_ = (int64_t)(b);                                         \
    if (a_ != b_) TL_FAIL_AT("%s == %s (%lld != %lld)", #a, #b, (long long)a_, (long long)b_); \
  } while (0)

#define ASSERT_STR_EQ(a, b)                                                  \
  do {                                                                       \
    const char *a_ = (a), *b_ = (b);                                         \
    if (strcmp(a_, b_) != 0) TL_FAIL_AT("%s == %s (\"%s\" != \"%s\")", #a, #b, a_, b_); \
  } while (0)

#define ASSERT_CONTAINS(hay, needle)                                                    \
  do {                                                                                  \
    const char *h_ = (hay), *n_ = (needle);                                             \
    if (!strstr(h_, n_)) TL_FAIL_AT("\"%s\" contains \"%s\"", h_, n_);                  \
  } while (0)

/* The tl call must succeed; on failure print its name, message and detail. */
#define ASSERT_OK(call)                                                               \
  do {                                                                                \
    int r_ = (call);                                                                  \
    if (r_ != 0) TL_FAIL_AT("%s -> %s: %s (%s)", #call, tl_err_name(r_), tl_strerror(r_), \
                            tl_err_detail());                                         \
  } while (0)

#define SKIP(...)                               \
  do {                                          \
    fprintf(stderr, "skip: ");                  \
    fprintf(stderr, __VA_ARGS__);               \
    fprintf(stderr, "\n");                      \
    return TEST_SKIP;                           \
  } while (0)

/* The directory holding tests/data (set by CMake). */
#ifndef TL_TEST_DATA_DIR
#define TL_TEST_DATA_DIR "tests/data"
#endif

#endif /* THREADLOOM_TEST_TASK_H */
