"""Classify images with a trained checkpoint (or an exported MINDIR): top-k classes and probabilities.

    python predict.py --predict_path=photos/ --checkpoint_file_path=output/ckpt/best.ckpt --top_k=5 \
        --predict_output=predictions.csv
    python predict.py --predict_path='photos/*.jpg' --mindir=output/resnet18_isqrt_cov.mindir
Without --config_path the run's own config.yaml (beside the model, or in its ckpt/ folder) sets image
size, normalisation and network; class names come from the run's class_names.json. With no model
flag it uses the demo run's ./output/ckpt/best.ckpt.
"""
import sys

from src.cli import run_cli


def main(argv=None):
    from src.predict import main as predict_main
    return predict_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
