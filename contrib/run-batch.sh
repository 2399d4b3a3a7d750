#!/bin/sh
# One batch of a plan as one unit of work for a scheduler (Slurm array task, Kubernetes
# Indexed Job pod, a plain loop): the ONE command line both contrib/slurm and contrib/k8s run.
#
#   contrib/run-batch.sh PLAN BATCH SHARED_DIR [batch-continue options...]
#
# PLAN        a plan file written by `plan-batch --output` (self-contained: commit, endpoint,
#             filters, files with sizes and hashes)
# BATCH       the batch number, 1..N
# SHARED_DIR  a folder every worker sees (NFS, Lustre, CephFS, a PVC). Files land in
#             SHARED_DIR/data (the same for all batches); each batch keeps its own task
#             records in SHARED_DIR/meta/batch-BATCH and its logs in SHARED_DIR/logs/batch-BATCH,
#             so a rerun of the same batch (requeue, retry) resumes where it stopped.
#
# Environment: PYTHON (default python3), HFDL_MAIN (default main.py beside contrib/),
# HF_TOKEN (read by main.py itself; never put it on a command line).
# Exit status: that of `main.py batch-continue` (0 done, 3 files failed, 4 disk full,
# 130/143 interrupted: rerun the same batch), 2 for bad arguments here.
set -eu

if [ "$#" -lt 3 ]; then
    echo "usage: run-batch.sh PLAN BATCH SHARED_DIR [batch-continue options...]" >&2
    exit 2
fi
plan=$1
batch=$2
shared=$3
shift 3
case $batch in
    '' | *[!0-9]* | 0*)
        echo "error: batch number must be a whole number from 1, not '$batch'" >&2
        exit 2 ;;
esac

main=${HFDL_MAIN:-$(dirname "$0")/../main.py}
exec "${PYTHON:-python3}" "$main" \
    --metadata-dir "$shared/meta/batch-$batch" \
    --downloads-dir "$shared/data" \
    --logs-dir "$shared/logs/batch-$batch" \
    batch-continue "$plan" "$batch" --local-dir "$shared/data" "$@"
