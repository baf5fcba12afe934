#!/usr/bin/env bash
# Issue 14's bar: each `influencekit evaluate` run takes <= 30 minutes on 2 cores.
# Runs the default command of each workload under /usr/bin/time -v and prints its wall clock,
# CPU time and peak memory; record the numbers with the tables (OUT_ROOT/WORKLOAD/results.md) in
# benchmarks/RESULTS.md. One thread per process: on a machine shared with other jobs a two-thread
# step waits for whichever thread was descheduled (RESULTS.md, mnist-lr runs 1 and 2).
#
#   benchmarks/bench_evaluate.sh DATA_DIR OUT_ROOT [WORKLOAD ...]   (default: mnist-lr mnist-mlp mnist-cnn)
set -euo pipefail
data_dir=${1:?usage: bench_evaluate.sh DATA_DIR OUT_ROOT [WORKLOAD ...]}
out_root=${2:?usage: bench_evaluate.sh DATA_DIR OUT_ROOT [WORKLOAD ...]}
shift 2
workloads=("$@")
[ ${#workloads[@]} -gt 0 ] || workloads=(mnist-lr mnist-mlp mnist-cnn)
for workload in "${workloads[@]}"; do
    out="$out_root/$workload"
    mkdir -p "$out"
    OMP_NUM_THREADS=1 /usr/bin/time -v influencekit evaluate --workload "$workload" --data-dir "$data_dir" --out "$out" \
        --workers 2 2> "$out/time.log"
    grep -E "Elapsed|User time|System time|Maximum resident" "$out/time.log" | sed "s/^/$workload: /"
done
