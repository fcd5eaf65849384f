#!/usr/bin/env bash
# bench/run.sh: runs every benchmark this machine can run, each against its baseline in the same
# run, writes each one's text output and JSON to bench/results/<machine>/ (machine = cores + GPU,
# or nogpu), then the report: README.md and SVG plots there (bench/report.py).
#
# Usage: bench/run.sh [--quick] [--out DIR] [--only LIST] PYTHON   (make bench passes the
#        free-threaded interpreter)
#   --quick    tiny sizes, 1-2 threads: checks the pipeline end to end in well under a minute; its
#              numbers mean nothing (default output bench/results/<machine>-quick/, not committed)
#   --out DIR  write there instead
#   --only L   run only these benchmarks (comma-separated names: scheduler, arena, device,
#              devices, device_state, executor, ...; scripts/gpu-check.sh picks what fits its
#              minutes)
# SHARE_ARGS="--threads 2,16 --reps 1" replaces bench_share.py's arguments.
# TORCH_PYTHON=/path/to/python picks the interpreter for the torch DataLoader baselines; by default
# build/bootstrap.env's GIL_PYTHON (the GIL baseline venv scripts/bootstrap.sh makes), else the first of PYTHON,
# python3.12, python3, python3.11, python3.13 that can import torch.
# A run first removes the previous run's *.txt, *.json, *.svg and README.md from the output
# directory, so the report never mixes two runs. A benchmark that fails is reported as failed (its
# text output says why), the others still run, and the script exits 1 at the end.
set -euo pipefail
main() {  # all in a function: bash parses it whole, so editing this file mid-run is harmless
here=$(cd "$(dirname "$0")/.." && pwd)
usage() { echo "usage: bench/run.sh [--quick] [--out DIR] [--only LIST] PYTHON" >&2; exit 2; }
quick=0 out="" only="" args=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1; shift ;;
    --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
    --only) [ $# -ge 2 ] || usage; only=",$2,"; shift 2 ;;
    -*) usage ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || usage
py=$1
for bin in tl-bench-scheduler tl-bench-arena tl-bench-device; do
  [ -x "$here/build/bench/$bin" ] || { echo "bench: no build/bench/$bin: run \`make build\` first" >&2; exit 1; }
done
gpu=$("$py" -c 'import threadloom as t
try:
    print(t._core.cuda_device_info(0)["name"].replace(" ", "-"))
except t.Error:
    print("nogpu")')
machine="$(nproc)cpu-$gpu"
if [ -z "$out" ]; then
  out=$here/bench/results/$machine
  [ $quick = 1 ] && out=$out-quick
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/*.txt "$out"/*.json "$out"/*.svg "$out"/README.md
echo "bench: results go to $out"

# -- what was measured, where, on which commit (the report's header) ----------------------------
via=""
[ -n "${MAKELEVEL:-}" ] && via="make bench -> "
commit=$(git -C "$here" rev-parse --short=12 HEAD 2>/dev/null || echo "${TL_COMMIT:-unknown}")
# (changes under bench/results/ are this or an earlier run's outputs, not code)
[ -n "$(git -C "$here" status --porcelain --untracked-files=no -- . ':!bench/results' 2>/dev/null)" ] &&
  commit="$commit (uncommitted changes)"
BENCH_MACHINE=$machine BENCH_GPU=$gpu BENCH_COMMIT=$commit BENCH_QUICK=$quick \
BENCH_COMMAND="${via}bench/run.sh ${args[*]}" "$py" - "$out/meta.json" <<'PY'
import json, os, platform, sys, time
model = "unknown"
try:
    with open("/proc/cpuinfo") as f:
        model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
except OSError:
    pass
mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
e = os.environ
json.dump({"machine": e["BENCH_MACHINE"], "gpu": e["BENCH_GPU"], "commit": e["BENCH_COMMIT"],
           "command": e["BENCH_COMMAND"], "quick": e["BENCH_QUICK"] == "1",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "cores": len(os.sched_getaffinity(0)), "cpu_model": model, "memory_gib": round(mem, 1),
           "kernel": platform.release(), "python": sys.version.split()[0],
           "gil": getattr(sys, "_is_gil_enabled", lambda: True)(),
           "loadavg_start": os.getloadavg()[0]},
          open(sys.argv[1], "w"), indent=1)
PY

# -- the benchmarks ------------------------------------------------------------------------------
failed=()
want() { [ -z "$only" ] || [[ $only == *",$1,"* ]]; }
run() {  # name command...: text output to $out/name.txt, failures collected
  local name=$1; shift
  want "$name" || return 0
  echo "== $name: $*"
  local shown="$*"
  if ! { echo "# ${shown//$here\//}"; echo "# $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) CPU(s), GPU: $gpu"; "$@"; } 2>&1 | tee "$out/$name.txt"; then
    echo "bench: $name FAILED (output above and in $out/$name.txt)" | tee -a "$out/$name.txt"
    failed+=("$name")
  fi
}
if [ $quick = 1 ]; then
  q_sched=(--threads 1,2 --scale 0.02 --reps 1)
  q_arena=(--threads 1,2 --sizes 64K,1M --live 8 --duration 0.05)
  q_exec=(--items 2000 --threads 1,2 --reps 1)
  q_start=(-n 3)
  q_ckpt=(--size 16 --sizes 4,16 --repeat 1)
  q_load=(--samples 400 --threads 1,2 --reps 1)
  q_foot=(--quick)
  q_share=(--per-thread 120 --threads 2 --reps 1 --rounds 1)
  q_dev=(--seconds 0.1)
  q_devs=(--quick)
  q_vision=(--quick)
  q_state=(--quick)
else
  # best of 5 for the loaders: on a small shared machine run-to-run noise is ~30%
  q_sched=() q_arena=() q_exec=() q_start=() q_ckpt=() q_load=(--reps 5) q_foot=() q_share=() q_dev=() q_devs=()
  q_vision=() q_state=()
fi
# SHARE_ARGS replaces bench_share.py's arguments (scripts/gpu-check.sh: one short run on 16 cores)
[ -n "${SHARE_ARGS:-}" ] && read -ra q_share <<< "$SHARE_ARGS"
run scheduler "$here/build/bench/tl-bench-scheduler" ${q_sched[@]+"${q_sched[@]}"} --json "$out/scheduler.json"
run arena "$here/build/bench/tl-bench-arena" ${q_arena[@]+"${q_arena[@]}"} --json "$out/arena.json"
run device "$here/build/bench/tl-bench-device" ${q_dev[@]+"${q_dev[@]}"} --json "$out/device.json"
# submission rate, the launch rate from 1..8 Python threads on sim:8 against the raw C loop
# (build/bench/tl-bench-launch.so), with and without loader threads, and the feeder
run devices "$py" "$here/bench/bench_devices.py" ${q_devs[@]+"${q_devs[@]}"} --json "$out/devices.json"
run device_state "$py" "$here/bench/bench_device_state.py" ${q_state[@]+"${q_state[@]}"} \
  --json "$out/device_state.json"
if [ "$gpu" != nogpu ]; then  # the same on the GPUs (cuda:0's streams on one; the report's GPU plots)
  run device_cuda "$here/build/bench/tl-bench-device" --cuda --sections launch,alloc \
    ${q_dev[@]+"${q_dev[@]}"} --json "$out/device_cuda.json"
  run devices_cuda "$py" "$here/bench/bench_devices.py" --cuda ${q_devs[@]+"${q_devs[@]}"} \
    --json "$out/devices_cuda.json" --gpu-json "$out"
  run device_state_cuda "$py" "$here/bench/bench_device_state.py" --cuda \
    ${q_state[@]+"${q_state[@]}"} --json "$out/device_state_cuda.json"
fi
run executor "$py" "$here/bench/bench_executor.py" ${q_exec[@]+"${q_exec[@]}"} --json "$out/executor.json"
run startup "$py" "$here/bench/bench_startup.py" ${q_start[@]+"${q_start[@]}"} --json "$out/startup.json"
run checkpoint "$py" "$here/bench/bench_checkpoint.py" ${q_ckpt[@]+"${q_ckpt[@]}"} --json "$out/checkpoint.json"
run share "$py" "$here/bench/bench_share.py" ${q_share[@]+"${q_share[@]}"} --json "$out/share.json"
run dataloader "$py" "$here/bench/bench_dataloader.py" ${q_load[@]+"${q_load[@]}"} --json "$out/dataloader.json"

# The torch DataLoader baselines run on the GIL baseline (build/venv-gil: python3.11 with torch
# from PyPI here, python3.12 on the GPU machine): without one, a JSON that says so, and the
# report leaves the series out with it.
torch_py="" tried=()
boot_torch=$(sed -n 's/^GIL_PYTHON := //p' "$here/build/bootstrap.env" 2>/dev/null || true)
for cand in ${TORCH_PYTHON:-} $boot_torch "$py" python3.12 python3 python3.11 python3.13; do
  command -v "$cand" >/dev/null 2>&1 || continue
  tried+=("$cand")
  if "$cand" -c 'import torch' >/dev/null 2>&1; then torch_py=$cand; break; fi
done
if [ -n "$torch_py" ]; then
  run dataloader_torch "$torch_py" "$here/bench/bench_dataloader_torch.py" ${q_load[@]+"${q_load[@]}"} \
    --json "$out/dataloader_torch.json"
elif want dataloader_torch; then
  reason="no interpreter on this machine imports torch (tried: ${tried[*]}); TORCH_PYTHON=/path/to/python picks one"
  echo "== dataloader_torch: skipped: $reason" | tee "$out/dataloader_torch.txt"
  REASON=$reason "$py" -c 'import json, os, sys; json.dump({"skipped": os.environ["REASON"]}, open(sys.argv[1], "w"))' \
    "$out/dataloader_torch.json"
fi
# First batch (fresh processes) and total memory of every loader's processes; the torch rows on
# torch_py, the rest on PYTHON.
run footprint "$py" "$here/bench/bench_dataloader_footprint.py" ${q_foot[@]+"${q_foot[@]}"} \
  ${torch_py:+--torch-python "$(command -v "$torch_py")"} --json "$out/footprint.json"
# The vision pipeline (examples/vision_pipeline.py's JPEG decode, crop, flip, normalize):
# threadloom's threads on PYTHON against torch's worker processes on torch_py, the same JPEGs and
# code, throughput, same-batches check, first batch and memory at torch's best num_workers.
run vision "$py" "$here/bench/bench_vision.py" ${q_vision[@]+"${q_vision[@]}"} \
  ${torch_py:+--torch-python "$(command -v "$torch_py")"} --json "$out/vision.json"

# -- the report ----------------------------------------------------------------------------------
"$py" "$here/bench/report.py" "$out"
echo "bench: report in ${out#"$here"/}/README.md"
if [ ${#failed[@]} -gt 0 ]; then
  echo "bench: FAILED: ${failed[*]} (see their .txt files in $out)" >&2
  exit 1
fi
}
main "$@"; exit $?  # one line: bash has read it all before main runs
