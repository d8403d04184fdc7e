"""Write a fine-grained dataset (or ImageNet's validation set) from its published archive as the
train/ and val/ class folders train.py reads, exactly as the official splits say.

    python scripts/prepare_dataset.py --dataset cub200 --src /data/CUB_200_2011 --dst /data/cub
    python scripts/prepare_dataset.py --dataset aircraft --src /data/fgvc-aircraft-2013b --dst /data/aircraft
    python scripts/prepare_dataset.py --dataset cars --src /data/stanford_cars --dst /data/cars
    python scripts/prepare_dataset.py --dataset imagenet --src /data/ILSVRC2012 --dst /data/imagenet

--src is the folder an archive was extracted into (or its parent). Layouts, splits and class folder
names: src/data/archives.py. A wrong or incomplete archive stops with one line; running again over a
finished destination does nothing and says so.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.cli import run_cli  # noqa: E402

HELP = {
    "cub200": "CUB-200-2011: CUB_200_2011/ with images/ and its .txt lists; val/ = the test split",
    "aircraft": "FGVC-Aircraft 2013b: fgvc-aircraft-2013b/data/; 100 variants, train/ = trainval, val/ = test",
    "cars": "Stanford Cars: cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat; val/ = test",
    "imagenet": "ImageNet validation: ILSVRC2012_img_val/ (50,000 images in one folder) and ILSVRC2012_devkit_t12/ "
                "-> val/<wnid>/ (checked against DST/train/ when it exists)",
}


def main(argv=None):
    from src.data.prepare import LINK_MODES, prepare
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="datasets:\n" + "\n".join(f"  {k:9s} {v}" for k, v in HELP.items()))
    parser.add_argument("--dataset", required=True, choices=sorted(HELP))
    parser.add_argument("--src", required=True, help="folder the archive was extracted into")
    parser.add_argument("--dst", required=True, help="dataset root to write: DST/train/<class>/, DST/val/<class>/")
    parser.add_argument("--link", default="auto", choices=LINK_MODES,
                        help="auto (default): hard links where the file system allows, else symbolic links; "
                             "copy: independent copies")
    parser.add_argument("--crop_banner", action="store_true",
                        help="aircraft: cut the copyright banner (bottom 20 px) off every image, written as new "
                             "JPEGs (quality 95). Default: images kept whole, as fast-MPN-COV trains on them "
                             "(its Aircraft transform resizes the whole image to 512x512)")
    args = parser.parse_args(argv)
    if args.crop_banner and args.dataset != "aircraft":
        parser.error("--crop_banner is for --dataset aircraft only")
    prepare(args.dataset, args.src, args.dst, link=args.link, crop_banner=args.crop_banner)
    return 0


if __name__ == "__main__":
    run_cli(main)
