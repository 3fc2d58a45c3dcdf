#!/usr/bin/env bash
# Run a queue of GPU jobs inside a time budget, keeping what each finished job wrote (for GPU machines lent for
# a fixed time: the jobs that fit run, in order, and every result made so far is packed after each one).
#   bash benchmarks/gpu_queue.sh JOBS BUDGET_S ARCHIVE
# JOBS: lines "EST_S TREE COMMAND...": COMMAND runs in the checkout TREE (e.g. one at another commit, with its
# .moefuse-provenance.json) if EST_S seconds still fit in BUDGET_S; '#' lines are skipped. For example:
#   170 . bash benchmarks/gpu_checks.sh tests benchmarks/results
#   110 . bash benchmarks/gpu_checks.sh train48 benchmarks/results lora48_b8 --per_device_train_batch_size 8
# ARCHIVE (a .tgz) gets the files created under any TREE's benchmarks/results since the queue started, and each
# job's log (logs/jobN.log); it is rewritten after every job.
set -uo pipefail
jobs_file=$1 budget=$2 archive=$3
start=$(date +%s)
work=$(mktemp -d)
touch "$work/started"
mkdir -p "$work/logs"
n=0
while read -r est tree cmd; do
    [[ -z "$est" || "$est" == \#* ]] && continue
    n=$((n + 1))
    now=$(($(date +%s) - start))
    if ((now + est > budget)); then
        echo "skip job $n at ${now}s (needs ~${est}s): $tree: $cmd"
        continue
    fi
    echo "job $n at ${now}s: $tree: $cmd"
    (cd "$tree" && bash -c "$cmd") >"$work/logs/job$n.log" 2>&1
    echo "  rc $? in $(($(date +%s) - start - now))s"
    tail -n 3 "$work/logs/job$n.log" | sed 's/^/  | /'
    find . -newer "$work/started" -type f -path '*/benchmarks/results/*' >"$work/new.txt"
    tar czf "$archive" -T "$work/new.txt" -C "$work" logs
done <"$jobs_file"
echo "queue done at $(($(date +%s) - start))s"
