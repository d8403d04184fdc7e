r"""Convert a PyTorch checkpoint of fast-MPN-COV, DropCov, iSICE or torchvision into a MindSpore .ckpt.

    python scripts/convert_torch_checkpoint.py --src model_best.pth.tar --dst model.ckpt \
        --arch resnet50 --head isqrt_cov --num_classes 1000 [--triu_order column]
    python scripts/convert_torch_checkpoint.py --src r50_acd_best.pth.tar --dst dropcov.ckpt --arch resnet50 --head dropcov
    python scripts/convert_torch_checkpoint.py --src Results/.../model_best.pth.tar --dst isice_cub.ckpt \
        --arch resnet50 --head isice --num_classes 200

DropCov's resnet*_ACD (its main.py's checkpoints: layer_reduce, layer_reduce_bn, eca_layer.conv, fc) and
iSICE's main.py models (features / representation.conv_dr_block / classifier) convert completely.

Reads torchvision ResNets and vgg16_bn, fast-MPN-COV's mpncovresnet50/101 and mpncovvgg16_bn, and
the checkpoints its main.py writes ({'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'},
features / representation / classifier, trained from scratch or finetuned, with DataParallel's
'module.'); the layout is detected from the keys and printed. --classifier defaults to the kind the
checkpoint holds (one linear layer, or VGG's 4096-4096 MLP).
--triu_order is the upper-triangle order the classifier was trained with: "row" (default) for
models of fast-MPN-COV's current code, "column" for its published mpncovresnet50-15991845.pth, which
fast-MPN-COV issue #20 says was trained with the earlier Triuvec (see src/models/convert.py).
A checkpoint whose head does not fit --head (e.g. torchvision weights for --head isqrt_cov) gives
the backbone only (for initialisation). Exits with status 2 and a list of missing / unexpected /
wrongly shaped keys when the checkpoint does not fit the network.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("GLOG_v", "3")  # MindSpore's INFO/WARNING lines would bury the report

from src.models.convert import TRIU_ORDERS, ConversionError, convert_checkpoint  # noqa: E402
from src.models.network import ARCHS, CLASSIFIER_CHOICES, HEADS  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="PyTorch checkpoint (.pth)")
    parser.add_argument("--dst", required=True, help="MindSpore checkpoint to write (.ckpt)")
    parser.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    parser.add_argument("--head", default="isqrt_cov", choices=sorted(HEADS))
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--dimension_reduction", type=int, default=None,
                        help="channels of the head's 1x1 reduction conv (0: none; default: the head's, "
                             "256 for isqrt_cov, dropcov and isice)")
    parser.add_argument("--triu_order", default="row", choices=TRIU_ORDERS,
                        help="upper-triangle order the fc was trained with: row = fast-MPN-COV's current "
                             "Triuvec; column = its earlier one (published mpncovresnet50-15991845.pth)")
    parser.add_argument("--classifier", default=None, choices=CLASSIFIER_CHOICES,
                        help="classifier of the target network (default: the kind the checkpoint holds)")
    parser.add_argument("--drop_classifier", action="store_true",
                        help="leave the classifier out (to finetune on another number of classes)")
    args = parser.parse_args(argv)
    try:
        convert_checkpoint(args.src, args.dst, arch=args.arch, head=args.head, num_classes=args.num_classes,
                           dimension_reduction=args.dimension_reduction, triu_order=args.triu_order,
                           drop_classifier=args.drop_classifier, classifier=args.classifier)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
