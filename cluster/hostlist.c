/* cluster/hostlist.c: SLURM host lists ("gpu-[001-004,7],login1") expanded into host names.
 *
 * SLURM hands every task its job's nodes as one compressed list (SLURM_JOB_NODELIST); node 0 of
 * the rendezvous is its first name, and a wrong expansion sends every rank to the wrong master.
 * The expansion follows `scontrol show hostnames` (the Python tests compare the two on a table
 * of cases when scontrol is installed), except where scontrol's reading is surprising, which
 * threadloom rejects with a message instead (see include/threadloom/cluster.h).
 *
 * How: the list is split into names at top-level separators; each name is parsed once into
 * segments (literal text, then an optional bracket group whose ranges live in one shared
 * vector), the number of names it yields and their byte size are checked against the caps
 * *before* anything is allocated for them, then an odometer over the groups writes the names,
 * groups varying in scontrol's order (odometer_group). Nothing recurses, so a hostile list of many groups only
 * costs time and memory linear in its length. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"
#include "threadloom/cluster.h"
#include "threadloom/error.h"

// ---------------------------------------------------------------------------------------------
// Parsed form of one name
// ---------------------------------------------------------------------------------------------

typedef struct {
  uint64_t lo, hi; /* inclusive bounds, lo <= hi */
  unsigned width;  /* digits LO was written with: every number is zero-padded to it */
} hl_range_t;

typedef struct {
  size_t lit, lit_len; /* the literal text before the group: list[lit .. lit+lit_len) */
  size_t first;        /* index of the group's first range in the range vector */
  size_t nranges;      /* 0: no group (the text after the last ']', or a name without one) */
  size_t ri;           /* odometer: the range being expanded */
  uint64_t v;          /* odometer: the current number within ranges[ri] */
} hl_seg_t;

typedef struct {
  const char* list;   /* the input (borrowed) */
  hl_seg_t* segs;     /* the current name's segments (owned) */
  size_t nsegs, segcap;
  size_t ngroups;     /* how many of the current name's segments have a bracket group */
  hl_range_t* ranges; /* the current name's ranges (owned) */
  size_t nranges, rangecap;
  char** hosts;       /* the result so far (owned until handed to the caller) */
  size_t nhosts, hostcap;
  size_t bytes;       /* bytes of the names in hosts, terminators included */
} hl_parser_t;

static int is_sep(char c) { return c == ',' || c == ' ' || c == '\t' || c == '\n'; }
static int is_digit(char c) { return c >= '0' && c <= '9'; }

/* Grows *vec (of elements of size `size`) so that it holds at least need elements. */
static int grow(void** vec, size_t* cap, size_t need, size_t size) {
  if (need <= *cap) return 0;
  size_t ncap = *cap ? *cap * 2 : 8;
  while (ncap < need) ncap *= 2;
  void* p = realloc(*vec, ncap * size);
  if (!p) return tl__fail(TL_ENOMEM, "hostlist: growing a vector to %zu elements", ncap);
  *vec = p;
  *cap = ncap;
  return 0;
}

/* Failure detail that quotes (the start of) the list and the position. */
#define HL_FAIL(p, err, pos, ...)                                                                \
  hl_fail((p), (err), (pos), __VA_ARGS__)
static int hl_fail(const hl_parser_t* p, int err, size_t pos, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int hl_fail(const hl_parser_t* p, int err, size_t pos, const char* fmt, ...) {
  char what[160];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  size_t len = strlen(p->list);
  return tl__fail(err, "hostlist \"%.64s%s\": %s at position %zu", p->list, len > 64 ? "..." : "",
                  what, pos);
}

/* How a failure names the character it found: itself when printable ASCII, else its byte value
 * (a byte of a UTF-8 sequence printed alone would make the message invalid UTF-8), with a hint
 * for the usual culprit: a dash that an editor or a chat turned into an en or em dash. */
static const char* char_desc(char c, char buf[96]) {
  unsigned char u = (unsigned char)c;
  if (u >= 0x20 && u < 0x7f)
    snprintf(buf, 96, "'%c'", c);
  else if (u >= 0x80)
    snprintf(buf, 96, "byte 0x%02X, not ASCII (host lists are ASCII: a '-' typed as an en dash?)", u);
  else
    snprintf(buf, 96, "control byte 0x%02X", u);
  return buf;
}

static unsigned digits_of(uint64_t v) {
  unsigned d = 1;
  while (v >= 10) {
    v /= 10;
    d++;
  }
  return d;
}

/* Parses decimal digits at *pos into *v (at least one; no overflow). */
static int parse_number(hl_parser_t* p, size_t* pos, uint64_t* v, unsigned* width) {
  const char* s = p->list;
  size_t start = *pos;
  if (!is_digit(s[start])) {
    if (s[start] == '\0') return HL_FAIL(p, TL_EINVAL, start, "'[' has no matching ']'");
    if (is_sep(s[start]) && s[start] != ',')
      return HL_FAIL(p, TL_EINVAL, start, "whitespace inside brackets");
    char d[96];
    return HL_FAIL(p, TL_EINVAL, start, "expected a digit, found %s", char_desc(s[start], d));
  }
  uint64_t x = 0;
  size_t i = start;
  for (; is_digit(s[i]); i++) {
    unsigned d = (unsigned)(s[i] - '0');
    if (x > (UINT64_MAX - d) / 10) return HL_FAIL(p, TL_EINVAL, start, "number too large");
    x = x * 10 + d;
  }
  *v = x;
  *width = (unsigned)(i - start);
  *pos = i;
  return 0;
}

static int push_seg(hl_parser_t* p, size_t lit, size_t lit_len, size_t first, size_t nranges) {
  int err = grow((void**)&p->segs, &p->segcap, p->nsegs + 1, sizeof *p->segs);
  if (err) return err;
  p->segs[p->nsegs++] = (hl_seg_t){.lit = lit, .lit_len = lit_len, .first = first, .nranges = nranges};
  return 0;
}

// ---------------------------------------------------------------------------------------------
// One name: parse, check the caps, expand
// ---------------------------------------------------------------------------------------------

/* Parses the name starting at *pos into p->segs/p->ranges; *count and *maxlen receive the number
 * of names it yields and the longest one's length. Leaves *pos at the separator or the end. */
static int parse_name(hl_parser_t* p, size_t* pos, uint64_t* count, size_t* maxlen) {
  const char* s = p->list;
  size_t i = *pos, lit = i;
  uint64_t total = 1;
  size_t len = 0;
  p->nsegs = p->nranges = p->ngroups = 0;
  for (;;) {
    char c = s[i];
    if (c == '\0' || is_sep(c)) {
      if (i > lit || p->nsegs == 0) {
        int err = push_seg(p, lit, i - lit, 0, 0);
        if (err) return err;
        len += i - lit;
      }
      break;
    }
    if (c == ']') return HL_FAIL(p, TL_EINVAL, i, "']' without '['");
    if (c != '[') {
      i++;
      continue;
    }
    size_t open = i, lit_len = i - lit, first = p->nranges;
    uint64_t n = 0;
    unsigned w = 0;
    i++;
    for (;;) {
      hl_range_t r;
      size_t at = i;
      int err = parse_number(p, &i, &r.lo, &r.width);
      if (err) return s[at] == '\0' ? HL_FAIL(p, TL_EINVAL, open, "'[' has no matching ']'") : err;
      r.hi = r.lo;
      if (s[i] == '-') {
        i++;
        unsigned hw;
        if (!is_digit(s[i]))
          return HL_FAIL(p, TL_EINVAL, i, "expected the upper bound of a range after '-'");
        if ((err = parse_number(p, &i, &r.hi, &hw))) return err;
        if (r.hi < r.lo)
          return HL_FAIL(p, TL_EINVAL, at, "reversed range %" PRIu64 "-%" PRIu64, r.lo, r.hi);
      }
      if (r.hi - r.lo >= TL_HOSTLIST_MAX_HOSTS || (n += r.hi - r.lo + 1) > TL_HOSTLIST_MAX_HOSTS)
        return HL_FAIL(p, TL_ERANGE, open, "more than %u hosts", TL_HOSTLIST_MAX_HOSTS);
      unsigned rw = digits_of(r.hi) > r.width ? digits_of(r.hi) : r.width;
      if (rw > w) w = rw;
      if ((err = grow((void**)&p->ranges, &p->rangecap, p->nranges + 1, sizeof *p->ranges)))
        return err;
      p->ranges[p->nranges++] = r;
      if (s[i] == ',') {
        i++;
        continue;
      }
      if (s[i] == ']') {
        i++;
        break;
      }
      if (s[i] == '\0') return HL_FAIL(p, TL_EINVAL, open, "'[' has no matching ']'");
      if (s[i] == '[') return HL_FAIL(p, TL_EINVAL, i, "nested '['");
      if (is_sep(s[i])) return HL_FAIL(p, TL_EINVAL, i, "whitespace inside brackets");
      char d[96];
      return HL_FAIL(p, TL_EINVAL, i, "expected ',' or ']', found %s", char_desc(s[i], d));
    }
    int err = push_seg(p, lit, lit_len, first, p->nranges - first);
    if (err) return err;
    p->ngroups++;
    if (total > TL_HOSTLIST_MAX_HOSTS / n)
      return HL_FAIL(p, TL_ERANGE, open, "more than %u hosts", TL_HOSTLIST_MAX_HOSTS);
    total *= n;
    len += lit_len + w;
    if (len > TL_HOSTLIST_MAX_NAME)
      return HL_FAIL(p, TL_EINVAL, open, "a name longer than %d bytes", TL_HOSTLIST_MAX_NAME);
    lit = i;
  }
  if (len > TL_HOSTLIST_MAX_NAME)
    return HL_FAIL(p, TL_EINVAL, *pos, "a name longer than %d bytes", TL_HOSTLIST_MAX_NAME);
  *pos = i;
  *count = total;
  *maxlen = len;
  return 0;
}

/* The segment index of the group that varies `step`-th fastest (step 0: fastest), among the
 * name's p->ngroups bracket groups. scontrol 22.05 varies the LAST group fastest, then the others
 * from the first (left) to the second-to-last: a[1-2]b[1-2]c[1-2] gives a1b1c1 a1b1c2 a2b1c1
 * a2b1c2 a1b2c1 ... (its parser expands the last group as a range of the name and the groups
 * before it recursively). With one or two groups this is plain left-to-right order. */
static size_t odometer_group(const hl_parser_t* p, size_t step) {
  size_t want = step == 0 ? p->ngroups - 1 : step - 1; /* the want-th group, counting from 0 */
  for (size_t k = 0, seen = 0; k < p->nsegs; k++) {
    if (!p->segs[k].nranges) continue;
    if (seen++ == want) return k;
  }
  return 0; /* not reached: want < ngroups */
}

/* Writes the names of the parsed name into p->hosts (room for count more is reserved). */
static int expand_name(hl_parser_t* p, uint64_t count) {
  char buf[TL_HOSTLIST_MAX_NAME + 1];
  for (size_t k = 0; k < p->nsegs; k++) {
    p->segs[k].ri = 0;
    if (p->segs[k].nranges) p->segs[k].v = p->ranges[p->segs[k].first].lo;
  }
  for (uint64_t made = 0; made < count; made++) {
    size_t len = 0;
    for (size_t k = 0; k < p->nsegs; k++) {
      const hl_seg_t* g = &p->segs[k];
      memcpy(buf + len, p->list + g->lit, g->lit_len);
      len += g->lit_len;
      if (g->nranges) {
        const hl_range_t* r = &p->ranges[g->first + g->ri];
        len += (size_t)snprintf(buf + len, sizeof buf - len, "%0*" PRIu64, (int)r->width, g->v);
      }
    }
    buf[len] = '\0';
    char* name = malloc(len + 1);
    if (!name) return tl__fail(TL_ENOMEM, "hostlist: a name of %zu bytes", len + 1);
    memcpy(name, buf, len + 1);
    p->hosts[p->nhosts++] = name;
    p->bytes += len + 1;
    /* Advance the odometer in scontrol's order (see odometer_next). */
    for (size_t step = 0; step < p->ngroups; step++) {
      hl_seg_t* g = &p->segs[odometer_group(p, step)];
      if (g->v < p->ranges[g->first + g->ri].hi) {
        g->v++;
        break;
      }
      g->ri = g->ri + 1 < g->nranges ? g->ri + 1 : 0;
      g->v = p->ranges[g->first + g->ri].lo;
      if (g->ri != 0) break; /* no carry */
    }
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// API
// ---------------------------------------------------------------------------------------------

void tl_hostlist_free(char** hosts, size_t n) {
  if (!hosts) return;
  for (size_t i = 0; i < n; i++) free(hosts[i]);
  free(hosts);
}

int tl_hostlist_expand(const char* list, char*** out, size_t* n) {
  tl__clear_detail();
  if (out) *out = NULL;
  if (n) *n = 0;
  if (!list || !out || !n) return tl__fail(TL_EINVAL, "tl_hostlist_expand: list, out and n must not be NULL");
  hl_parser_t p = {.list = list};
  int err = 0;
  size_t i = 0;
  for (;;) {
    while (is_sep(list[i])) i++;
    if (list[i] == '\0') break;
    size_t start = i;
    uint64_t count = 0;
    size_t maxlen = 0;
    if ((err = parse_name(&p, &i, &count, &maxlen))) break;
    if (count > TL_HOSTLIST_MAX_HOSTS - p.nhosts) {
      err = HL_FAIL(&p, TL_ERANGE, start, "more than %u hosts", TL_HOSTLIST_MAX_HOSTS);
      break;
    }
    if (count * (maxlen + 1) > TL_HOSTLIST_MAX_BYTES - p.bytes) {
      err = HL_FAIL(&p, TL_ERANGE, start, "more than %zu bytes of names", TL_HOSTLIST_MAX_BYTES);
      break;
    }
    if ((err = grow((void**)&p.hosts, &p.hostcap, p.nhosts + (size_t)count, sizeof *p.hosts))) break;
    if ((err = expand_name(&p, count))) break;
  }
  free(p.segs);
  free(p.ranges);
  if (err) {
    tl_hostlist_free(p.hosts, p.nhosts);
    return err;
  }
  *out = p.hosts;
  *n = p.nhosts;
  return 0;
}
