/* tests/c/test-error.c: the error table and the per-thread detail. */
#include <errno.h>
#include <pthread.h>

#include "core/internal.h"
#include "task.h"
#include "threadloom/threadloom.h"

static const int codes[] = {
#define XX(name, value, msg, hint) TL_##name,
    TL_ERRNO_MAP(XX)
#undef XX
};

TEST_IMPL(error_table_complete) {
  size_t n = sizeof codes / sizeof codes[0];
  ASSERT(n >= 20);
  for (size_t i = 0; i < n; i++) {
    int c = codes[i];
    ASSERT(c < 0);
    ASSERT(c > TL_ERRNO_MAX);
    /* values are dense and in table order: -1, -2, ... */
    ASSERT_EQ(c, -(int)(i + 1));
    ASSERT(strncmp(tl_err_name(c), "TL_E", 4) == 0);
    ASSERT(strlen(tl_strerror(c)) > 5);
    ASSERT(strlen(tl_err_hint(c)) > 10);
    if (c != TL_EUNKNOWN) {
      ASSERT(strcmp(tl_err_name(c), "TL_EUNKNOWN") != 0);
      ASSERT(strcmp(tl_strerror(c), "unknown error") != 0);
    }
    for (size_t j = 0; j < i; j++) ASSERT(strcmp(tl_err_name(c), tl_err_name(codes[j])) != 0);
  }
  ASSERT_STR_EQ(tl_err_name(TL_EINVAL), "TL_EINVAL");
  ASSERT_STR_EQ(tl_strerror(TL_ENODRIVER), "no usable NVIDIA driver");
  return 0;
}

TEST_IMPL(error_unknown_code) {
  ASSERT_STR_EQ(tl_err_name(0), "TL_EUNKNOWN");
  ASSERT_STR_EQ(tl_err_name(12345), "TL_EUNKNOWN");
  ASSERT_STR_EQ(tl_err_name(TL_ERRNO_MAX), "TL_EUNKNOWN");
  ASSERT_STR_EQ(tl_strerror(-9999), "unknown error");
  ASSERT(strlen(tl_err_hint(-9999)) > 10);
  return 0;
}

TEST_IMPL(error_translate_errno) {
  ASSERT_EQ(tl_translate_sys_error(0), 0);
  ASSERT_EQ(tl_translate_sys_error(ENOSPC), TL_ENOSPC);
  ASSERT_EQ(tl_translate_sys_error(EDQUOT), TL_ENOSPC);
  ASSERT_EQ(tl_translate_sys_error(EROFS), TL_EROFS);
  ASSERT_EQ(tl_translate_sys_error(EACCES), TL_EACCES);
  ASSERT_EQ(tl_translate_sys_error(ENOENT), TL_ENOENT);
  ASSERT_EQ(tl_translate_sys_error(ENOMEM), TL_ENOMEM);
  ASSERT_EQ(tl_translate_sys_error(EXDEV), TL_EIO); /* unmapped errno: an I/O error */
  return 0;
}

// Two threads fail at the same time with different details; each must read back its own.
enum { DETAIL_THREADS = 4, DETAIL_ROUNDS = 2000 };
static pthread_barrier_t detail_barrier;

static void* detail_worker(void* arg) {
  int id = (int)(intptr_t)arg;
  char want[64];
  pthread_barrier_wait(&detail_barrier);
  for (int r = 0; r < DETAIL_ROUNDS; r++) {
    snprintf(want, sizeof want, "thread %d round %d", id, r);
    int err = tl__fail(TL_EIO, "thread %d round %d", id, r);
    if (err != TL_EIO || strcmp(tl_err_detail(), want) != 0) return (void*)1;
    tl__clear_detail();
    if (tl_err_detail()[0] != '\0') return (void*)1;
  }
  return NULL;
}

TEST_IMPL(error_detail_per_thread) {
  pthread_t th[DETAIL_THREADS];
  ASSERT_EQ(pthread_barrier_init(&detail_barrier, NULL, DETAIL_THREADS), 0);
  for (int i = 0; i < DETAIL_THREADS; i++)
    ASSERT_EQ(pthread_create(&th[i], NULL, detail_worker, (void*)(intptr_t)i), 0);
  for (int i = 0; i < DETAIL_THREADS; i++) {
    void* rc;
    ASSERT_EQ(pthread_join(th[i], &rc), 0);
    ASSERT(rc == NULL);
  }
  pthread_barrier_destroy(&detail_barrier);
  return 0;
}
