/* tests/c/test-hostlist.c: tl_hostlist_expand on a table of lists, the ones users reported
 * (linux[1,2], names with dashes, zero padding) and the malformed ones, each failure with its
 * code and the position its detail names. The Python tests compare the same expansions with
 * `scontrol show hostnames` where it is installed. */
#include <stdlib.h>
#include <string.h>

#include "tests/c/task.h"
#include "threadloom/cluster.h"
#include "threadloom/error.h"

/* Expands list and joins the names with spaces into out (cap bytes); returns the code. */
static int expand_joined(const char* list, char* out, size_t cap) {
  char** hosts;
  size_t n;
  int err = tl_hostlist_expand(list, &hosts, &n);
  out[0] = '\0';
  if (err) {
    ASSERT(hosts == NULL);
    ASSERT_EQ(n, 0);
    return err;
  }
  size_t len = 0;
  for (size_t i = 0; i < n; i++) {
    size_t l = strlen(hosts[i]);
    ASSERT(len + l + 2 < cap);
    if (i) out[len++] = ' ';
    memcpy(out + len, hosts[i], l + 1);
    len += l;
  }
  tl_hostlist_free(hosts, n);
  return 0;
}

TEST_IMPL(hostlist_expands) {
  static const struct {
    const char* list;
    const char* want;
  } cases[] = {
      {"", ""},
      {"  , ,", ""},
      {"a", "a"},
      {"linux[1,2]", "linux1 linux2"},
      {"a,b", "a b"},
      {",a,,b,", "a b"},
      {"a b\tc\nd", "a b c d"},
      {"a,a", "a a"},
      {"node[001-003,7]", "node001 node002 node003 node7"},
      {"n[8-12]", "n8 n9 n10 n11 n12"},
      {"n[098-101]", "n098 n099 n100 n101"},
      {"n[1-010]", "n1 n2 n3 n4 n5 n6 n7 n8 n9 n10"},
      {"n[01-1]", "n01"},
      {"n0[8-9]", "n08 n09"},
      {"n[0001-0002]", "n0001 n0002"},
      {"[1-3]", "1 2 3"},
      {"a-[1-2]", "a-1 a-2"},
      {"gpu-node-[1-2],login.example.com", "gpu-node-1 gpu-node-2 login.example.com"},
      {"rack[1-2]-node[01-02]", "rack1-node01 rack1-node02 rack2-node01 rack2-node02"},
      {"n[1-2][3]", "n13 n23"},
      {"x[1-2]y[3-4]", "x1y3 x1y4 x2y3 x2y4"},
      {"n[1-2]-ib", "n1-ib n2-ib"},
      {"a.b-c[1-2].d", "a.b-c1.d a.b-c2.d"},
      {"n[1-2] , m", "n1 n2 m"},
      {"n[5]", "n5"},
      {"n[3,1,2]", "n3 n1 n2"},
      {"n[18446744073709551615]", "n18446744073709551615"},
      {"a_b[1-2],c", "a_b1 a_b2 c"},
      /* 3+ groups: scontrol varies the last group fastest, then the others from the left */
      {"a[1-2]b[1-2]c[1-2]", "a1b1c1 a1b1c2 a2b1c1 a2b1c2 a1b2c1 a1b2c2 a2b2c1 a2b2c2"},
      {"a[1,3]b[1-2]c[5-6]", "a1b1c5 a1b1c6 a3b1c5 a3b1c6 a1b2c5 a1b2c6 a3b2c5 a3b2c6"},
      {"a[1-2]b[1-2]c[1-2]d[1-2]",
       "a1b1c1d1 a1b1c1d2 a2b1c1d1 a2b1c1d2 a1b2c1d1 a1b2c1d2 a2b2c1d1 a2b2c1d2 "
       "a1b1c2d1 a1b1c2d2 a2b1c2d1 a2b1c2d2 a1b2c2d1 a1b2c2d2 a2b2c2d1 a2b2c2d2"},
  };
  char got[4096];
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    int err = expand_joined(cases[i].list, got, sizeof got);
    if (err) TL_FAIL_AT("\"%s\": %s (%s)", cases[i].list, tl_err_name(err), tl_err_detail());
    if (strcmp(got, cases[i].want) != 0)
      TL_FAIL_AT("\"%s\" -> \"%s\", want \"%s\"", cases[i].list, got, cases[i].want);
  }
  return 0;
}

TEST_IMPL(hostlist_rejects_malformed) {
  static const struct {
    const char* list;
    int err;
    const char* detail; /* a part of the detail text */
  } cases[] = {
      {"n[1-2", TL_EINVAL, "'[' has no matching ']' at position 1"},
      {"n[", TL_EINVAL, "no matching ']' at position 1"},
      {"n1-2]", TL_EINVAL, "']' without '[' at position 4"},
      {"n]", TL_EINVAL, "']' without '['"},
      {"n[1-2]]", TL_EINVAL, "']' without '[' at position 6"},
      {"n[3-1]", TL_EINVAL, "reversed range 3-1 at position 2"},
      {"a,n[10-09]", TL_EINVAL, "reversed range 10-9 at position 4"},
      {"n[]", TL_EINVAL, "expected a digit, found ']' at position 2"},
      {"n[1,,2]", TL_EINVAL, "expected a digit, found ',' at position 4"},
      {"n[a-b]", TL_EINVAL, "expected a digit, found 'a'"},
      {"n[-1]", TL_EINVAL, "expected a digit, found '-'"},
      {"n[1-]", TL_EINVAL, "upper bound"},
      {"n[1--2]", TL_EINVAL, "upper bound"},
      {"n[ 1-2]", TL_EINVAL, "whitespace inside brackets at position 2"},
      {"n[1,2 ]", TL_EINVAL, "whitespace inside brackets at position 5"},
      {"n[[1]]", TL_EINVAL, "found '['"},
      {"n[1[2]]", TL_EINVAL, "nested '['"},
      {"n[1x]", TL_EINVAL, "expected ',' or ']', found 'x'"},
      {"n[1\xe2\x80\x93" "3]", TL_EINVAL, "found byte 0xE2, not ASCII"}, /* an en dash */
      {"n[\x01]", TL_EINVAL, "found control byte 0x01"},
      {"n[99999999999999999999]", TL_EINVAL, "number too large"},
      {"n[0-1048576]", TL_ERANGE, "more than 1048576 hosts"},
      {"n[0-18446744073709551615]", TL_ERANGE, "more than"},
      {"a[0-1023]b[0-1023]c[0-1]", TL_ERANGE, "more than 1048576 hosts"},
      {"a[0-1023]b[0-1023],c", TL_ERANGE, "more than 1048576 hosts"},
  };
  char got[256];
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    int err = expand_joined(cases[i].list, got, sizeof got);
    if (err != cases[i].err)
      TL_FAIL_AT("\"%s\": got %s (%s), want %s", cases[i].list, tl_err_name(err), tl_err_detail(),
                 tl_err_name(cases[i].err));
    if (!strstr(tl_err_detail(), cases[i].detail))
      TL_FAIL_AT("\"%s\": detail \"%s\" lacks \"%s\"", cases[i].list, tl_err_detail(), cases[i].detail);
  }
  char** hosts = (char**)1;
  size_t n = 7;
  ASSERT_EQ(tl_hostlist_expand(NULL, &hosts, &n), TL_EINVAL);
  ASSERT(hosts == NULL);
  ASSERT_EQ(n, 0);
  tl_hostlist_free(NULL, 0);
  return 0;
}

TEST_IMPL(hostlist_limits) {
  /* Exactly the cap works; the names are right at both ends. */
  char** hosts;
  size_t n;
  ASSERT_OK(tl_hostlist_expand("a[0-1023]b[0000-1023]", &hosts, &n));
  ASSERT_EQ(n, TL_HOSTLIST_MAX_HOSTS);
  ASSERT_STR_EQ(hosts[0], "a0b0000");
  ASSERT_STR_EQ(hosts[1024], "a1b0000");
  ASSERT_STR_EQ(hosts[n - 1], "a1023b1023");
  tl_hostlist_free(hosts, n);
  /* A name of TL_HOSTLIST_MAX_NAME bytes is fine, one more is not. */
  char* big = malloc(TL_HOSTLIST_MAX_NAME + 16);
  ASSERT(big);
  memset(big, 'x', TL_HOSTLIST_MAX_NAME);
  big[TL_HOSTLIST_MAX_NAME] = '\0';
  ASSERT_OK(tl_hostlist_expand(big, &hosts, &n));
  ASSERT_EQ(n, 1);
  ASSERT_EQ(strlen(hosts[0]), TL_HOSTLIST_MAX_NAME);
  tl_hostlist_free(hosts, n);
  strcpy(big + TL_HOSTLIST_MAX_NAME - 1, "[10]"); /* 1023 + 2 digits */
  ASSERT_EQ(tl_hostlist_expand(big, &hosts, &n), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "longer than 1024 bytes");
  /* The detail quotes at most 64 bytes of a long list. */
  ASSERT(strlen(tl_err_detail()) < 200);
  free(big);
  return 0;
}
