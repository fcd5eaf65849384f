#!/usr/bin/env bash
# gpu-check.sh: the real-GPU verification in one command, for a machine that is lent for minutes.
#
#   scripts/gpu-check.sh pack        on the build machine: bundle the free-threaded interpreter,
#                                    the build and the shared libraries they need into
#                                    build/gpu-check/bundle.tar.xz (under 64 MiB), so a copy of
#                                    the working tree plus that one ignored path can run there
#   scripts/gpu-check.sh [--no-bench] [--out DIR] [--copy-to DIR]
#                                    on the GPU machine (or anywhere: GPU parts skip, saying why):
#                                    the GPU test suite, the GPU benchmarks and the CPU
#                                    benchmarks, results as JSON + Markdown in
#                                    bench/results/<machine>/ (default; <machine>-gpu-check/, not
#                                    committed, on a machine without a GPU), with gpu-check.md/.json;
#                                    --copy-to DIR copies that directory to DIR/<machine> (the
#                                    device machine's $OUT, which is what comes back)
#   scripts/gpu-check.sh --tests     only the GPU test suite (what `make gpu-test` runs)
#
# The GPU machine has no package registry and nothing built: only nvcc, CUDA 13, python3.12 with
# torch and 16 cores. So the run uses, in this order: a local build (build/ and the interpreter of
# build/bootstrap.env, the venv `make build` installed threadloom into) or the bundle (unpacked
# once into build/gpu-check/root: the interpreter, the installed threadloom package, pytest and
# what it imports, the test and benchmark binaries, and the libraries they link that a plain
# system may lack; CUDA's own
# libraries are taken from the system first). The test suite is the same one CI runs on sim:
# the C tests named gpu_* (tl-tests runs each in a forked child; exit 77 is a skip with the
# reason) and the Python tests marked gpu (the cuda half of every test parametrized over
# backends). The benchmarks are bench/run.sh's device benchmarks on sim and on cuda:0 and the
# CPU benchmarks that fit the time (scheduler, executor, share() at 2 and 16 threads, one short
# run, DataLoader against torch on TORCH_PYTHON, default python3.12); the whole run is sized to finish within 8 minutes on 16
# cores (GPU_CHECK_BUDGET seconds for the benchmarks, default 300).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
gc=$here/build/gpu-check
bundle=$gc/bundle.tar.xz
t_start=$(date +%s)
say() { printf 'gpu-check: %s\n' "$*" >&2; }
die() { printf 'gpu-check: error: %s\n' "$*" >&2; exit 1; }
elapsed() { echo $(( $(date +%s) - t_start )); }

# ---------------------------------------------------------------------------------------------
# pack (build machine)
# ---------------------------------------------------------------------------------------------
pack() {
  local envf=$here/build/bootstrap.env
  [ -f "$envf" ] && [ -x "$here/build/tests/c/tl-tests" ] || die "no build: run \`make build\` first"
  local py base prefix
  py=$(sed -n 's/^PYTHON := //p' "$envf")         # build/venv's: threadloom is installed there
  base=$(sed -n 's/^BASE_PYTHON := //p' "$envf")  # the interpreter that venv was made from
  prefix=$(cd "$(dirname "$base")/.." && pwd)
  local stage=$gc/stage
  rm -rf "$stage"
  mkdir -p "$stage/python" "$stage/lib" "$stage/site" "$stage/tree/build/lib" \
    "$stage/tree/build/bench" "$stage/tree/build/tests/c"
  say "staging the interpreter from $prefix (without its static library, headers, tkinter, idle, bytecode)"
  tar -C "$prefix" --exclude='libpython*.a' --exclude='__pycache__' --exclude='idlelib' \
    --exclude='tkinter' --exclude='turtledemo' --exclude='ensurepip' --exclude='pydoc_data' \
    --exclude='_tkinter*.so' --exclude='include' --exclude='test' -cf - . | tar -C "$stage/python" -xf -
  say "staging the installed threadloom, and pytest with what it imports, as pip installed them"
  "$py" - "$stage/site" <<'PY' || die "could not stage the installed packages of $py"
import importlib.metadata as md, os, shutil, sys
from packaging.requirements import Requirement
dst, todo, done = sys.argv[1], ["threadloom", "pytest"], set()
while todo:
    name = todo.pop()
    if name in done:
        continue
    done.add(name)
    dist = md.distribution(name)
    for f in dist.files or ():
        src = str(f.locate())
        if f.parts[0] == ".." or "__pycache__" in f.parts or not os.path.isfile(src):
            continue
        os.makedirs(os.path.join(dst, os.path.dirname(str(f))), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, str(f)))
    if name == "pytest":
        for r in map(Requirement, dist.requires or ()):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
PY
  cp -a "$here"/build/lib/libthreadloom.so* "$stage/tree/build/lib/"
  cp -a "$here"/build/bench/tl-bench-* "$stage/tree/build/bench/"
  cp -a "$here/build/tests/c/tl-tests" "$stage/tree/build/tests/c/"
  # the shared libraries all of it links, but not the C library, the loader, or the NVIDIA
  # driver's (the GPU machine's own); libcudart goes last on the search path (system first)
  local objs=("$stage"/python/bin/python3.13t "$stage"/python/lib/libpython3*.so.1.0
              "$stage"/python/lib/python3*/lib-dynload/*.so "$stage"/tree/build/lib/libthreadloom.so
              "$stage"/tree/build/bench/tl-bench-* "$stage"/tree/build/tests/c/tl-tests
              "$stage"/site/threadloom/_core*.so "$stage"/site/threadloom/libthreadloom.so)
  ldd "${objs[@]}" 2>/dev/null | awk '/=> \//{print $3}' | sort -u | while read -r lib; do
    case $(basename "$lib") in
      libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libgcc_s.so*|\
      libthreadloom.so*|libpython3*|libcuda.so*|libnvidia*) ;;
      libcudart.so*) mkdir -p "$stage/lib/cuda" && cp -L "$lib" "$stage/lib/cuda/" ;;
      *) cp -L "$lib" "$stage/lib/" ;;
    esac
  done
  git -C "$here" rev-parse --short=12 HEAD > "$stage/commit" 2>/dev/null || echo unknown > "$stage/commit"
  say "compressing (xz)"
  tar -C "$stage" -cf - . | xz -T0 -6 > "$bundle.tmp"
  mv "$bundle.tmp" "$bundle"
  rm -rf "$stage"
  local size
  size=$(stat -c %s "$bundle")
  [ "$size" -lt $((64 << 20)) ] || die "the bundle is $((size >> 20)) MiB: over the 64 MiB a GPU run can carry"
  say "wrote ${bundle#"$here"/} ($((size >> 20)) MiB, under the 64 MiB limit); on the GPU machine run scripts/gpu-check.sh with build/gpu-check carried along"
}

# ---------------------------------------------------------------------------------------------
# The environment: a local build, or the bundle
# ---------------------------------------------------------------------------------------------
setup() {
  local envf=$here/build/bootstrap.env
  if [ -f "$envf" ] && [ -x "$here/build/tests/c/tl-tests" ] && [ -z "${GPU_CHECK_BUNDLE:-}" ]; then
    PY=$(sed -n 's/^PYTHON := //p' "$envf")   # build/venv: threadloom and pytest installed
    TORCH_PY=${TORCH_PYTHON:-$(sed -n 's/^GIL_PYTHON := //p' "$envf")}
    say "using the local build (build/, $PY)"
  else
    [ -f "$bundle" ] || die "no build and no bundle: run \`make build\` here, or \`scripts/gpu-check.sh pack\` on the build machine and carry build/gpu-check"
    local root=$gc/root
    if [ ! -f "$root/.unpacked" ] || [ "$bundle" -nt "$root/.unpacked" ]; then
      say "unpacking the bundle"
      rm -rf "$root" && mkdir -p "$root"
      xz -dc "$bundle" | tar -C "$root" -xf -
      cp -a "$root/tree/." "$here/"   # the build outputs, at their places in the tree
      touch "$root/.unpacked"
    fi
    PY=$root/python/bin/python3.13t
    export TL_COMMIT; TL_COMMIT="$(cat "$root/commit" 2>/dev/null || echo unknown) (bundle)"
    export PYTHONPATH=$root/site   # the installed threadloom and pytest, as pip laid them out
    TORCH_PY=${TORCH_PYTHON:-python3.12}
    local cuda_libs=""
    for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/lib/x86_64-linux-gnu; do
      [ -d "$d" ] && cuda_libs=$cuda_libs:$d
    done
    export LD_LIBRARY_PATH="$root/python/lib:$here/build/lib:$root/lib${cuda_libs}:$root/lib/cuda${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "using the bundle ($PY)"
  fi
  [ -x "$PY" ] || die "no interpreter at $PY"
  export PYTHONDONTWRITEBYTECODE=1
}

# ---------------------------------------------------------------------------------------------
# The GPU test suite (also `make gpu-test`)
# ---------------------------------------------------------------------------------------------
run_tests() {  # writes $1/tests.txt and sets C_* / PY_* counts
  local out=$1
  local tl=$here/build/tests/c/tl-tests
  C_PASS=0 C_SKIP=0 C_FAIL=0
  : > "$out/tests.txt"
  say "C tests gpu_*"
  for t in $("$tl" --list | grep '^gpu_'); do
    local rc=0
    "$tl" "$t" >> "$out/tests.txt" 2>&1 || rc=$?
    case $rc in 0) C_PASS=$((C_PASS + 1)) ;; 77) C_SKIP=$((C_SKIP + 1)) ;; *) C_FAIL=$((C_FAIL + 1)) ;; esac
  done
  grep -E '^(ok|skip|FAIL|CRASH|TIMEOUT) ' "$out/tests.txt" | sed 's/^/  /' >&2 || true
  say "Python tests marked gpu"
  local rc=0
  (cd "$here" && "$PY" -P -m pytest tests/python -q -rs -m gpu -p no:cacheprovider) \
    > "$out/tests_python.txt" 2>&1 || rc=$?
  tail -n 25 "$out/tests_python.txt" >&2
  PY_SUMMARY=$(grep -E '(passed|failed|skipped|error)' "$out/tests_python.txt" | tail -1 || true)
  PY_RC=$rc
  [ $rc -eq 0 ] || [ $rc -eq 5 ]  # 5: nothing collected
}

# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
mode=all out="" copy_to=""
while [ $# -gt 0 ]; do
  case $1 in
    pack) pack; exit 0 ;;
    --tests) mode=tests; shift ;;
    --no-bench) mode=nobench; shift ;;
    --out) out=$2; shift 2 ;;
    --copy-to) copy_to=$2; shift 2 ;;
    *) die "usage: scripts/gpu-check.sh [pack | --tests | --no-bench] [--out DIR] [--copy-to DIR]" ;;
  esac
done
setup
if [ "$mode" = tests ]; then
  tmp=$(mktemp -d)
  ok=0
  run_tests "$tmp" || ok=1
  say "C: $C_PASS passed, $C_SKIP skipped, $C_FAIL failed; Python: $PY_SUMMARY"
  rm -rf "$tmp"
  [ $ok -eq 0 ] && [ "$C_FAIL" -eq 0 ]
  exit $?
fi

gpu=$("$PY" -c 'import threadloom as t
try:
    print(t._core.cuda_device_info(0)["name"].replace(" ", "-"))
except t.Error:
    print("nogpu")')
machine="$(nproc)cpu-$gpu"
# without a GPU the run must not replace `make bench`'s full report of this machine
[ "$gpu" = nogpu ] && def_out=$here/bench/results/$machine-gpu-check || def_out=$here/bench/results/$machine
out=${out:-$def_out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
logs=$gc/logs  # bench/run.sh empties $out of *.txt first: the logs join it at the end
rm -rf "$logs" && mkdir -p "$logs"
"$PY" -m threadloom info > "$logs/info.txt" 2>&1 || true
sed 's/^/  /' "$logs/info.txt" >&2
if [ "$gpu" = nogpu ]; then
  why=$(grep -m1 '^  none:' "$logs/info.txt" | sed 's/^  none: //' || echo "no GPU")
  say "no usable GPU here: the GPU tests and the cuda benchmarks skip ($why)"
fi

tests_ok=1
run_tests "$logs" || tests_ok=0
[ "$C_FAIL" -eq 0 ] || tests_ok=0
say "tests: C gpu_*: $C_PASS passed, $C_SKIP skipped, $C_FAIL failed; Python -m gpu: $PY_SUMMARY ($(elapsed) s so far)"

bench_rc=0
if [ "$mode" = all ]; then
  budget=${GPU_CHECK_BUDGET:-300}
  only=device,devices,device_cuda,devices_cuda,scheduler,executor,share,dataloader,dataloader_torch
  say "benchmarks ($only) within $budget s"
  # share: issue 19's 16-thread goal (>= 85% of linear), one run of 3 rounds (~30 s)
  SHARE_ARGS="--threads 2,$(nproc) --reps 1 --rounds 3" TORCH_PYTHON=$TORCH_PY timeout --kill-after=10 "$budget" \
    bash "$here/bench/run.sh" --only "$only" --out "$out" "$PY" > "$out/bench.log" 2>&1 || bench_rc=$?
  tail -n 5 "$out/bench.log" >&2
  if [ $bench_rc -eq 124 ] || [ $bench_rc -eq 137 ]; then
    say "the benchmarks ran past $budget s: drawing the report from what finished"
    "$PY" "$here/bench/report.py" "$out" >&2 || true
  fi
fi

# the summary: gpu-check.json and gpu-check.md next to the benchmark report
for f in info tests tests_python; do cp "$logs/$f.txt" "$out/gpu-check-$f.txt"; done
GC_OUT=$out GC_GPU=$gpu GC_MACHINE=$machine GC_ELAPSED=$(elapsed) GC_CPASS=$C_PASS \
GC_CSKIP=$C_SKIP GC_CFAIL=$C_FAIL GC_PY="$PY_SUMMARY" GC_PYRC=$PY_RC GC_BENCH=$bench_rc \
GC_MODE=$mode GC_COMMIT=$(git -C "$here" rev-parse --short=12 HEAD 2>/dev/null || echo "${TL_COMMIT:-unknown}") \
"$PY" - <<'PY'
import json, os
e = os.environ
out = e["GC_OUT"]
res = {"machine": e["GC_MACHINE"], "gpu": e["GC_GPU"], "commit": e["GC_COMMIT"],
       "seconds": int(e["GC_ELAPSED"]),
       "c_gpu_tests": {"passed": int(e["GC_CPASS"]), "skipped": int(e["GC_CSKIP"]),
                       "failed": int(e["GC_CFAIL"])},
       "python_gpu_tests": {"summary": e["GC_PY"], "exit": int(e["GC_PYRC"])},
       "benchmarks_exit": None if e["GC_MODE"] != "all" else int(e["GC_BENCH"])}
json.dump(res, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)
skips = [l.strip() for l in open(os.path.join(out, "gpu-check-tests.txt")) if l.startswith("skip: ")]
md = ["# gpu-check: %s" % res["machine"], "",
      "`scripts/gpu-check.sh` on commit `%s`, %d s." % (res["commit"], res["seconds"]), "",
      "| part | result |", "|---|---|",
      "| C tests gpu_* | %(passed)d passed, %(skipped)d skipped, %(failed)d failed |" % res["c_gpu_tests"],
      "| Python tests -m gpu | %s |" % (res["python_gpu_tests"]["summary"] or "no summary line"),
      "| benchmarks | %s |" % ("not run" if res["benchmarks_exit"] is None else
                               "README.md (bench/run.sh exit %d)" % res["benchmarks_exit"]), "",
      "Logs: gpu-check-info.txt (`python -m threadloom info`), gpu-check-tests.txt (C), "
      "gpu-check-tests_python.txt (pytest)."]
if e["GC_GPU"] == "nogpu":
    md += ["", "No usable GPU on this machine, so the GPU parts skipped:", ""]
    md += ["- " + s for s in sorted(set(skips))[:3]]
open(os.path.join(out, "gpu-check.md"), "w").write("\n".join(md) + "\n")
PY
if [ -n "$copy_to" ]; then
  mkdir -p "$copy_to/$machine"
  cp -a "$out/." "$copy_to/$machine/"
  say "copied to $copy_to/$machine"
fi
say "done in $(elapsed) s: ${out#"$here"/}/gpu-check.md, README.md"
[ $tests_ok -eq 1 ]
