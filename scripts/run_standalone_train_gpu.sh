#!/usr/bin/env bash
# Single-GPU training, in the model zoo's argument order:
#   bash run_standalone_train_gpu.sh DATA_PATH CONFIG_PATH [RESUME_CKPT]
#   bash run_standalone_train_gpu.sh DATA_PATH CONFIG_PATH RUN_EVAL EVAL_DATASET_PATH [RESUME_CKPT]
USAGE="bash $(basename "$0") DATA_PATH CONFIG_PATH [RESUME_CKPT] | DATA_PATH CONFIG_PATH RUN_EVAL EVAL_DATASET_PATH [RESUME_CKPT]"
. "$(dirname "$0")/launch_args.sh"
nargs 2 5 $#
need_file CONFIG_PATH "$2"
data_root DATA_PATH "$1" train
CONFIG_PATH=$2; RESUME_CKPT=""; EXTRA=()
if [ $# -eq 3 ]; then
  is_bool "$3" && fail "RUN_EVAL '$3' needs EVAL_DATASET_PATH after it"
  is_count "$3" && fail "one GPU: no DEVICE_NUM here (use run_distribute_train_gpu.sh)"
  RESUME_CKPT=$3
elif [ $# -ge 4 ]; then
  run_eval_flags "$3" "$4"
  RESUME_CKPT=${5:-}
fi
[ -z "$RESUME_CKPT" ] || need_file RESUME_CKPT "$RESUME_CKPT"
[ -z "$RESUME_CKPT" ] || EXTRA+=(--resume_ckpt="$RESUME_CKPT")
set -x
python "$ROOT/train.py" --config_path="$CONFIG_PATH" --device_target="GPU" --data_path="$DATA_ROOT" \
  --output_path="${OUTPUT_PATH:-./output}" "${EXTRA[@]}"
