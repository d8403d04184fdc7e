#!/usr/bin/env bash
# Data-parallel training on CPU with msrun (MindSpore's launcher; mpirun also works, see README).
#   bash run_distribute_train_cpu.sh DATA_PATH CONFIG_PATH WORKER_NUM [extra train.py flags]
USAGE="bash $(basename "$0") DATA_PATH CONFIG_PATH WORKER_NUM [extra train.py flags]"
. "$(dirname "$0")/launch_args.sh"
nargs 3 999 $#
data_root DATA_PATH "$1" train
need_file CONFIG_PATH "$2"
is_count "$3" || fail "WORKER_NUM '$3' is not a positive integer"
CONFIG_PATH=$2; WORKER_NUM=$3; shift 3
command -v msrun >/dev/null || fail "msrun not found (it comes with mindspore)"
OUTPUT_PATH=${OUTPUT_PATH:-./output}
PORT=${MASTER_PORT:-$((20000 + RANDOM % 20000))}
set -x
msrun --worker_num="$WORKER_NUM" --local_worker_num="$WORKER_NUM" --master_port="$PORT" \
  --log_dir="$OUTPUT_PATH/msrun_log" --join=True "$ROOT/train.py" --config_path="$CONFIG_PATH" \
  --run_distribute=True --device_num="$WORKER_NUM" --device_target=CPU --data_path="$DATA_ROOT" \
  --output_path="$OUTPUT_PATH" "$@"
