"""Train an iSQRT-COV (or GAP) ResNet. With no arguments: the CPU demo on handwritten digits.

    python train.py --config_path=./config/resnet50_imagenet2012_config.yaml --device_target=GPU \
        --data_path=/path/to/imagenet --output_path=./output
    mpirun -n 4 python train.py ... --run_distribute=True --device_num=4
"""
import sys

from src.cli import run_cli


def main(argv=None):
    from src.config import enter_output_dir, load_config
    cfg = enter_output_dir(load_config(argv))
    from src.engine import Trainer
    return Trainer(cfg).fit()


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
