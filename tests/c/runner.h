/* tests/c/runner.h: the runner's entry point, also used by the harness's own tests. */
#ifndef THREADLOOM_TEST_RUNNER_H
#define THREADLOOM_TEST_RUNNER_H

typedef enum { RUN_PASS, RUN_SKIP, RUN_FAIL, RUN_CRASH, RUN_TIMEOUT } run_status_t;

/* Runs the named test (or helper) in a forked child with its timeout. */
run_status_t run_in_child(const char* name);
const char* run_status_name(run_status_t s);

#endif /* THREADLOOM_TEST_RUNNER_H */
