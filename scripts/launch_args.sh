# Argument checks shared by the launch scripts (sourced, not run). Every mistake ends in one line
# on stderr that says what the script expects, and exit status 2.
#
# The model zoo's scripts (mindspore-ai/models official/cv/ResNet/scripts) take DATASET_PATH as the
# split folder itself ({ImageNet}/train to train, the validation folder to evaluate); this project
# takes the folder holding train/ and val/. A DATA_PATH named train (or val) whose parent holds it
# is therefore read as its parent, and said so.

ROOT=$(cd "$(dirname "$0")/.." && pwd)

fail() { echo "error: $*; usage: $USAGE" >&2; exit 2; }
nargs() { [ "$3" -ge "$1" ] && [ "$3" -le "$2" ] || fail "$3 argument(s)"; }  # MIN MAX $#
is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_bool() { [[ "$1" =~ ^(True|False|true|false)$ ]]; }
need_file() { [ -f "$2" ] || fail "$1 '$2' is not a file"; }

# data_root NAME PATH SPLIT: sets DATA_ROOT to the folder holding SPLIT/ (PATH, or its parent when
# PATH is the model zoo's split folder).
data_root() {
  local name=$1 path=$2 split=$3
  [ -d "$path" ] || fail "$name '$path' is not a folder"
  path=$(cd "$path" && pwd)
  if [ -d "$path/$split" ]; then
    DATA_ROOT=$path
  elif [ "$(basename "$path")" = "$split" ]; then
    DATA_ROOT=$(dirname "$path")
    echo "note: $name '$path' is a $split/ folder (the model zoo's DATASET_PATH): using its parent $DATA_ROOT"
  else
    fail "$name '$path' holds no $split/ folder: pass the folder that holds train/ and val/"
  fi
}

# run_eval_flags RUN_EVAL EVAL_DATASET_PATH: the model zoo's evaluation-while-training arguments. train.py
# always evaluates DATA_ROOT/val (every eval_interval epochs); RUN_EVAL=False keeps the last epoch's only.
run_eval_flags() {
  is_bool "$1" || fail "RUN_EVAL '$1' is not True or False"
  [ -d "$2" ] || fail "EVAL_DATASET_PATH '$2' is not a folder"
  if [[ "$1" =~ ^[Tt] ]]; then
    [ "$(cd "$2" && pwd)" = "$DATA_ROOT/val" ] || \
      fail "EVAL_DATASET_PATH '$2' is not $DATA_ROOT/val, the folder train.py evaluates"
  else
    EXTRA+=(--eval_interval=1000000)
  fi
}

# sourced with the script's arguments: -h / --help prints the usage
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then echo "usage: $USAGE"; exit 0; fi
