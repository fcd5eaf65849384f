#!/usr/bin/env bash
# bench/run.sh: runs every benchmark this machine can run, each against its baseline in the same
# run, and writes the outputs to bench/results/<machine>/ (machine = cores + GPU, or nogpu).
# Usage: bench/run.sh PYTHON   (make bench passes the free-threaded interpreter)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${1:?usage: bench/run.sh PYTHON}
gpu=$(PYTHONPATH=$here/python "$py" -c 'import threadloom as t
try:
    print(t._core.cuda_device_info(0)["name"].replace(" ", "-"))
except t.Error:
    print("nogpu")')
machine="$(nproc)cpu-$gpu"
out=$here/bench/results/$machine
mkdir -p "$out"
echo "bench: results go to bench/results/$machine"
run() {  # name command...
  local name=$1; shift
  echo "== $name: $*"
  { echo "# $*"; echo "# $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) CPU(s), GPU: $gpu"; "$@"; } 2>&1 | tee "$out/$name.txt"
}
run scheduler "$here/build/bench/tl-bench-scheduler"
run arena "$here/build/bench/tl-bench-arena"
run executor "$py" "$here/bench/bench_executor.py" --json "$out/executor.json"
run startup "$py" "$here/bench/bench_startup.py" --json "$out/startup.json"
run checkpoint "$py" "$here/bench/bench_checkpoint.py" --json "$out/checkpoint.json"
run dataloader "$py" "$here/bench/bench_dataloader.py" --json "$out/dataloader.json"
