/* tests/fuzz/fuzz-hostlist.c: libFuzzer target for tl_hostlist_expand.
 *
 * Built with -DTL_FUZZ=ON and clang (see tests/fuzz/README.md). Every input must either expand
 * or fail with TL_EINVAL/TL_ERANGE and a detail text, without leaks or out-of-bounds access; an
 * expansion must stay within the caps and produce names without separators. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "threadloom/cluster.h"
#include "threadloom/error.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  char* s = malloc(size + 1);
  if (!s) return 0;
  memcpy(s, data, size);
  s[size] = '\0';
  char** hosts;
  size_t n;
  int err = tl_hostlist_expand(s, &hosts, &n);
  if (err) {
    if ((err != TL_EINVAL && err != TL_ERANGE && err != TL_ENOMEM) || hosts || n ||
        !tl_err_detail()[0])
      abort();
  } else {
    if (n > TL_HOSTLIST_MAX_HOSTS || (n && !hosts)) abort();
    for (size_t i = 0; i < n; i++) {
      size_t len = strlen(hosts[i]);
      if (len == 0 || len > TL_HOSTLIST_MAX_NAME || strpbrk(hosts[i], ", \t\n[]")) abort();
    }
    tl_hostlist_free(hosts, n);
  }
  free(s);
  return 0;
}
