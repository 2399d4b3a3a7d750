#!/usr/bin/env bash
# Downloads batch BATCH of PLAN (a file written by `plan-batch --output`) under SHARED_DIR: the one
# command a scheduler runs for each batch (contrib/slurm/download-array.sbatch runs it per array task).
#
#   contrib/run-batch.sh PLAN BATCH SHARED_DIR
#
# Layout under SHARED_DIR, one metadata and log folder per batch so that tasks never share state:
#   meta/batch-N/   the task records of batch N (a rerun of batch N resumes from them)
#   logs/batch-N/   the tool's log files for batch N
#   data/batch-N/   the files of batch N (one folder per batch: the disk marker of a folder holds
#                   one batch; with shared-folder support this becomes data/ for all batches)
# The token comes from the environment (HF_TOKEN), never from this file or the command line.
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 PLAN BATCH SHARED_DIR" >&2
  exit 2
fi
plan=$1 batch=$2 shared=$3
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

exec "${PYTHON:-python}" "$repo/main.py" \
  --metadata-dir "$shared/meta/batch-$batch" --downloads-dir "$shared/downloads" \
  --logs-dir "$shared/logs/batch-$batch" \
  batch-continue "$plan" "$batch" --local-dir "$shared/data/batch-$batch"
