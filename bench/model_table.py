"""Parameters and multiply-adds of every backbone x head of src.models, with the published
reference accuracies, for the README's results table (not a timing benchmark).

For each arch in ARCHS and head in HEADS (whatever the registries hold), two networks are built
with create_model and measured with src.models.count_params / count_flops:
- "imagenet": 1000 classes, the default classifier (classifier="auto": fast-MPN-COV's choice, the
  4096-4096 MLP for vgg16_bn + isqrt_cov), at 224x224;
- "fine_grained": 200 classes (CUB-200-2011), one linear classifier (fast-MPN-COV's finetuning
  replaces any classifier with one linear layer), at 448x448.
FLOPs are multiply-adds (torchvision's convention; see src/models/complexity.py).

    python bench/model_table.py                         # -> bench/results/model_table.json
    python bench/model_table.py --archs resnet18,vgg16_bn --markdown /tmp/table.md
"""
import argparse
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402

from src.models import ARCHS, HEADS, count_flops, count_params, create_model  # noqa: E402
from src.models.network import resolve_classifier  # noqa: E402
from src.run_log import write_json  # noqa: E402

SETTINGS = {"imagenet": {"num_classes": 1000, "image_size": 224, "classifier": "auto"},
            "fine_grained": {"num_classes": 200, "image_size": 448, "classifier": "linear"}}

_FMC = "fast-MPN-COV README (github.com/jiangtaoxie/fast-MPN-COV)"
_BCNN = "B-CNN authors' code README (Lin et al., ICCV 2015; vis-www.cs.umass.edu/bcnn), fine-tuned, SVM on the features"
_DROPCOV = "DropCov README (github.com/mingzeG/DropCov), main results on ImageNet"
_ISICE = "iSICE README (github.com/csiro-robotics/iSICE), Birds, finetuned with their AdamW protocol"
# Published accuracies (%), verified in the sources named; (arch, head, dataset) -> [(value, what, source)].
# ImageNet: single 224 crop, top-1 accuracy = 100 - the published top-1 error.
REFERENCES = {
    ("resnet50", "gap", "ImageNet"): [(76.07, "top-1, the paper's ResNet-50 baseline as this project's README "
                                       "quotes it (not re-verified here)", "README")],
    ("resnet50", "isqrt_cov", "ImageNet"): [(77.86, "top-1, paper (22.14 err)", _FMC),
                                             (78.29, "top-1, fast-MPN-COV PyTorch (21.71 err)", _FMC)],
    ("resnet101", "isqrt_cov", "ImageNet"): [(78.79, "top-1, paper (21.21 err)", _FMC),
                                              (79.01, "top-1, fast-MPN-COV PyTorch (20.99 err)", _FMC)],
    ("vgg16_bn", "isqrt_cov", "ImageNet"): [(73.45, "top-1, paper (26.55 err)", _FMC),
                                             (76.02, "top-1, fast-MPN-COV PyTorch (23.98 err)", _FMC)],
    ("resnet50", "isqrt_cov", "CUB"): [(88.1, "paper", _FMC), (88.0, "fast-MPN-COV PyTorch", _FMC)],
    ("resnet101", "isqrt_cov", "CUB"): [(88.7, "paper", _FMC)],
    ("vgg16_bn", "isqrt_cov", "CUB"): [(87.2, "paper (VGG-D)", _FMC), (87.0, "fast-MPN-COV PyTorch (VGG-D)", _FMC)],
    ("vgg16_bn", "bcnn", "CUB"): [(84.0, "B-CNN [D,D] (VGG-D, no BN)", _BCNN), (84.1, "B-CNN [D,M]", _BCNN)],
    ("resnet34", "dropcov", "ImageNet"): [(76.81, "top-1 (their GAP ResNet-34: 74.19)", _DROPCOV)],
    ("resnet50", "dropcov", "ImageNet"): [(78.19, "top-1 (their GAP ResNet-50: 76.02)", _DROPCOV)],
    ("resnet101", "dropcov", "ImageNet"): [(79.51, "top-1 (their GAP ResNet-101: 77.67)", _DROPCOV)],
    ("resnet50", "isice", "CUB"): [(85.9, "iSICE (their iSQRT-COV: 84.3)", _ISICE)],
    ("vgg16_bn", "isice", "CUB"): [(86.5, "iSICE, VGG-16 (their iSQRT-COV: 84.5)", _ISICE)],
    ("vgg16_bn", "cbp", "CUB"): [(84.0, "Tensor Sketch, d = 8192 (VGG-D): NOT VERIFIED from the paper's text "
                                 "(Gao et al., CVPR 2016); a third-party index lists 84.0 and 84.3", "unverified")],
}


# B-CNN keeps all C^2 entries (fast-MPN-COV pairs it with VGG's 512 channels): on a 2048-channel
# ResNet its classifier alone would hold 4.2 G parameters at 1000 classes, so it is not built.
TOO_BIG = {("bcnn", 2048)}


def measure(arch, head, setting):
    s = SETTINGS[setting]
    net = create_model(arch, head, s["num_classes"], classifier=s["classifier"])
    flops = count_flops(net, s["image_size"])
    row = {"arch": arch, "head": head, "setting": setting, "classifier": resolve_classifier(arch, head, s["classifier"]),
           "num_classes": s["num_classes"], "image_size": s["image_size"], "params": count_params(net),
           "representation_dim": int(net.representation.output_dim), "flops": flops}
    del net
    return row


def markdown(rows):
    """One line per backbone x head: ImageNet params / GFLOPs at 224, fine-grained at 448, references."""
    by = {(r["arch"], r["head"], r["setting"]): r for r in rows}
    lines = ["| Backbone | Head | Classifier (ImageNet) | #Params (M), 1000 classes | GFLOPs 224 (meta-layer) "
             "| #Params (M), 200 classes | GFLOPs 448 (meta-layer) | Published accuracy (%) |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for arch in ARCHS:
        for head in HEADS:
            a, b = by.get((arch, head, "imagenet")), by.get((arch, head, "fine_grained"))
            if a is None or b is None:
                continue
            refs = []
            for dataset in ("ImageNet", "CUB"):
                refs += [f"{dataset} {v} ({what})" for v, what, _ in REFERENCES.get((arch, head, dataset), [])]
            lines.append(f"| {arch} | {head} | {a['classifier']} | {a['params'] / 1e6:.2f} | "
                         f"{a['flops']['total'] / 1e9:.2f} ({a['flops']['meta'] / 1e9:.2f}) | {b['params'] / 1e6:.2f} | "
                         f"{b['flops']['total'] / 1e9:.2f} ({b['flops']['meta'] / 1e9:.2f}) | {'; '.join(refs) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated archs (default: all)")
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated heads (default: all)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "model_table.json"))
    parser.add_argument("--markdown", default="", help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    archs, heads = args.archs.split(","), args.heads.split(",")
    unknown = [a for a in archs if a not in ARCHS] + [h for h in heads if h not in HEADS]
    if unknown:
        raise SystemExit(f"model_table.py: unknown arch/head {', '.join(unknown)}: archs {', '.join(ARCHS)}; "
                         f"heads {', '.join(HEADS)}")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rows, skipped = [], []
    for arch in archs:
        channels = ARCHS[arch].build(2).out_channels
        for head in heads:
            if (head, channels) in TOO_BIG:
                skipped.append({"arch": arch, "head": head, "why": f"{channels}^2-dimensional representation"})
                continue
            for setting in SETTINGS:
                rows.append(measure(arch, head, setting))
                r = rows[-1]
                print(f"{arch:10s} {head:10s} {setting:12s} {r['classifier']:6s} {r['params'] / 1e6:8.2f} M "
                      f"{r['flops']['total'] / 1e9:8.2f} G (meta {r['flops']['meta'] / 1e9:.3f} G)", flush=True)
    result = {"convention": "FLOPs = multiply-adds of convolutions, fully connected layers and the "
                            "representation's matrix products (src.models.count_flops); params = trainable",
              "settings": SETTINGS, "mindspore": ms.__version__, "python": platform.python_version(),
              "rows": rows, "not_built": skipped,
              "references": [{"arch": a, "head": h, "dataset": d, "value": v, "what": w, "source": s}
                             for (a, h, d), refs in REFERENCES.items() for v, w, s in refs]}
    write_json(args.out, result)
    print(f"wrote {args.out}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
