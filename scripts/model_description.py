"""Print the MindSpore model zoo's "Model Description" table of a finished training run.

    python scripts/model_description.py RUN

RUN is train.py's --output_path. The table (Model Version, Resource, Uploaded Date, MindSpore Version,
Dataset, Training Parameters, Optimizer, Loss Function, outputs, Loss, Accuracy, Speed, Total time,
Parameters (M), Checkpoint for Fine tuning, config) comes from the run's files: ckpt/config.yaml,
metrics.jsonl, logs/rank_0.log, ckpt/environment.json (the machine, recorded at train start) and
ckpt/best.ckpt.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.cli import run_cli  # noqa: E402


def main(argv=None):
    from src.model_description import describe_run, format_table
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", metavar="RUN", help="the run's folder (train.py's --output_path)")
    args = parser.parse_args(argv)
    rows, column = describe_run(args.run)
    print(format_table(rows, column))
    return 0


if __name__ == "__main__":
    run_cli(main)
