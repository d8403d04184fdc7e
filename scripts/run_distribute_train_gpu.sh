#!/usr/bin/env bash
# Data-parallel training on the GPUs of this machine with OpenMPI (the seed's command line).
# Several machines: export MPI_HOSTS="host1:8,host2:8" before running (passed to mpirun -H).
#   bash run_distribute_train_gpu.sh DATA_PATH CONFIG_PATH DEVICE_NUM [RESUME_CKPT]
# The model zoo's argument order works too (told apart by the third argument: an integer is DEVICE_NUM):
#   bash run_distribute_train_gpu.sh DATASET_PATH CONFIG_PATH [RESUME_CKPT]
#   bash run_distribute_train_gpu.sh DATASET_PATH CONFIG_PATH RUN_EVAL EVAL_DATASET_PATH [RESUME_CKPT]
# on $DEVICE_NUM GPUs, 8 by default as the model zoo's script.
USAGE="bash $(basename "$0") DATA_PATH CONFIG_PATH DEVICE_NUM [RESUME_CKPT], or the model zoo's DATASET_PATH CONFIG_PATH [RESUME_CKPT] | DATASET_PATH CONFIG_PATH RUN_EVAL EVAL_DATASET_PATH [RESUME_CKPT]"
. "$(dirname "$0")/launch_args.sh"
nargs 2 5 $#
need_file CONFIG_PATH "$2"
data_root DATA_PATH "$1" train
CONFIG_PATH=$2; RESUME_CKPT=""; EXTRA=()
if [ $# -ge 3 ] && is_count "$3"; then
  [ $# -le 4 ] || fail "$# arguments with DEVICE_NUM '$3' third"
  N=$3; RESUME_CKPT=${4:-}
else
  N=${DEVICE_NUM:-8}
  is_count "$N" || fail "DEVICE_NUM='$N' in the environment is not a positive integer"
  echo "model zoo argument order: $N GPUs (DEVICE_NUM=$N; export DEVICE_NUM to change it)"
  if [ $# -eq 3 ]; then
    is_bool "$3" && fail "RUN_EVAL '$3' needs EVAL_DATASET_PATH after it"
    [ -f "$3" ] || fail "third argument '$3' is neither DEVICE_NUM (a positive integer) nor a RESUME_CKPT file"
    RESUME_CKPT=$3
  elif [ $# -ge 4 ]; then
    is_bool "$3" || fail "third argument '$3' is neither DEVICE_NUM (a positive integer) nor RUN_EVAL (True/False)"
    run_eval_flags "$3" "$4"
    RESUME_CKPT=${5:-}
  fi
fi
[ -z "$RESUME_CKPT" ] || need_file RESUME_CKPT "$RESUME_CKPT"
[ -z "$RESUME_CKPT" ] || EXTRA+=(--resume_ckpt="$RESUME_CKPT")
command -v mpirun >/dev/null || fail "mpirun not found: apt-get install openmpi-bin libopenmpi-dev"
OUTPUT_PATH=${OUTPUT_PATH:-./output}
HOSTS=()
[ -n "${MPI_HOSTS:-}" ] && HOSTS=(-H "$MPI_HOSTS")
mkdir -p "$OUTPUT_PATH"
set -x
mpirun --allow-run-as-root -n "$N" "${HOSTS[@]}" --output-filename "$OUTPUT_PATH/log_output" \
  --merge-stderr-to-stdout python "$ROOT/train.py" --config_path="$CONFIG_PATH" --run_distribute=True \
  --device_num="$N" --device_target="GPU" --data_path="$DATA_ROOT" --output_path="$OUTPUT_PATH" "${EXTRA[@]}"
