#!/usr/bin/env bash
# Data-parallel training on CPU with msrun (MindSpore's launcher; mpirun also works, see README).
usage() {
  echo "usage: bash $0 DATA_PATH CONFIG_PATH WORKER_NUM [extra train.py flags]"
}
if [ $# -lt 3 ]; then usage; exit 1; fi
DATA_PATH=$1; CONFIG_PATH=$2; WORKER_NUM=$3; shift 3
[ -d "$DATA_PATH" ] || { echo "error: DATA_PATH '$DATA_PATH' is not a folder"; usage; exit 1; }
[ -f "$CONFIG_PATH" ] || { echo "error: CONFIG_PATH '$CONFIG_PATH' is not a file"; usage; exit 1; }
[[ "$WORKER_NUM" =~ ^[1-9][0-9]*$ ]] || { echo "error: WORKER_NUM '$WORKER_NUM' is not a positive integer"; usage; exit 1; }
command -v msrun >/dev/null || { echo "error: msrun not found (it comes with mindspore)"; exit 1; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUTPUT_PATH=${OUTPUT_PATH:-./output}
PORT=${MASTER_PORT:-$((20000 + RANDOM % 20000))}
set -x
msrun --worker_num="$WORKER_NUM" --local_worker_num="$WORKER_NUM" --master_port="$PORT" \
  --log_dir="$OUTPUT_PATH/msrun_log" --join=True "$ROOT/train.py" --config_path="$CONFIG_PATH" \
  --run_distribute=True --device_num="$WORKER_NUM" --device_target=CPU --data_path="$DATA_PATH" \
  --output_path="$OUTPUT_PATH" "$@"
