#!/usr/bin/env bash
# Data-parallel training on the GPUs of this machine with OpenMPI (the seed's command line).
# Several machines: export MPI_HOSTS="host1:8,host2:8" before running (passed to mpirun -H).
usage() {
  echo "usage: bash $0 DATA_PATH CONFIG_PATH DEVICE_NUM [RESUME_CKPT]"
  echo "  DATA_PATH    folder holding train/ and val/ (ImageNet layout)"
  echo "  CONFIG_PATH  e.g. ./config/resnet50_imagenet2012_config.yaml"
  echo "  DEVICE_NUM   number of GPUs (processes), >= 1"
  echo "  RESUME_CKPT  optional: output/ckpt/latest.ckpt of an interrupted run"
}
if [ $# -lt 3 ] || [ $# -gt 4 ]; then usage; exit 1; fi
DATA_PATH=$1; CONFIG_PATH=$2; DEVICE_NUM=$3; RESUME_CKPT=${4:-}
[ -d "$DATA_PATH" ] || { echo "error: DATA_PATH '$DATA_PATH' is not a folder"; usage; exit 1; }
[ -f "$CONFIG_PATH" ] || { echo "error: CONFIG_PATH '$CONFIG_PATH' is not a file"; usage; exit 1; }
[[ "$DEVICE_NUM" =~ ^[1-9][0-9]*$ ]] || { echo "error: DEVICE_NUM '$DEVICE_NUM' is not a positive integer"; usage; exit 1; }
if [ -n "$RESUME_CKPT" ] && [ ! -f "$RESUME_CKPT" ]; then echo "error: RESUME_CKPT '$RESUME_CKPT' is not a file"; usage; exit 1; fi
command -v mpirun >/dev/null || { echo "error: mpirun not found: apt-get install openmpi-bin libopenmpi-dev"; exit 1; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUTPUT_PATH=${OUTPUT_PATH:-./output}
HOSTS=()
[ -n "${MPI_HOSTS:-}" ] && HOSTS=(-H "$MPI_HOSTS")
EXTRA=()
[ -n "$RESUME_CKPT" ] && EXTRA=(--resume_ckpt="$RESUME_CKPT")
mkdir -p "$OUTPUT_PATH"
set -x
mpirun --allow-run-as-root -n "$DEVICE_NUM" "${HOSTS[@]}" --output-filename "$OUTPUT_PATH/log_output" \
  --merge-stderr-to-stdout python "$ROOT/train.py" --config_path="$CONFIG_PATH" --run_distribute=True \
  --device_num="$DEVICE_NUM" --device_target="GPU" --data_path="$DATA_PATH" --output_path="$OUTPUT_PATH" "${EXTRA[@]}"
