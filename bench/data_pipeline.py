"""Data-pipeline throughput of the training augmentation on CPU (not a test).

Decode, random resized crop to 224 (area 0.08-1, aspect 3/4-4/3), horizontal flip, normalise with
the ImageNet mean/std, HWC -> CHW, batch, over a folder of realistic JPEGs, per worker count:
  project   src.data.create_dataset(training=True): ImageFolderDataset + MindSpore's C++ ops
            (the fused decode-and-crop RandomCropDecodeResize), as train.py runs it
  pillow    the same transforms in plain Pillow + NumPy (no torchvision), images decoded and
            transformed in a multiprocessing pool of that many worker processes, batches
            stacked in the main process (what a PyTorch DataLoader does)
The images: real photos (scikit-learn's sample images china.jpg and flower.jpg), cut into varied
crops, resized to 500x375 (an average ImageNet photo) and saved as JPEG quality 90.

    python bench/data_pipeline.py                               # 200 images, workers 1 and 2
    python bench/data_pipeline.py --images 32 --workers 1 --repeats 1 --out /tmp/d.json
"""
import argparse
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_CONFIG = os.path.join(ROOT, "config", "resnet50_imagenet2012_config.yaml")
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


# ----------------------------------------------------------------------------- images
def write_images(folder, count, width=500, height=375, classes=4, seed=0):
    """``count`` JPEGs (quality 90) of width x height in ``classes`` class folders under folder/train.

    Each is a random crop (half to all of the photo's width, the target's aspect ratio,
    random position, mirrored half of the time) of one of scikit-learn's two sample photos,
    resized with Lanczos. Returns the train folder."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    train = os.path.join(folder, "train")
    for c in range(classes):
        os.makedirs(os.path.join(train, f"class_{c}"), exist_ok=True)
    aspect = width / height
    for i in range(count):
        src = photos[i % len(photos)]
        sw, sh = src.size
        max_w = min(sw, int(sh * aspect))
        w = rng.randint(max(16, max_w // 2), max_w)
        h = int(round(w / aspect))
        x, y = rng.randint(0, sw - w), rng.randint(0, sh - h)
        img = src.resize((width, height), Image.LANCZOS, box=(x, y, x + w, y + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(os.path.join(train, f"class_{i % classes}", f"img_{i:05d}.jpg"), quality=90)
    return train


def list_images(train):
    return [os.path.join(train, c, f) for c in sorted(os.listdir(train)) for f in sorted(os.listdir(os.path.join(train, c)))]


# ----------------------------------------------------------------------------- Pillow pipeline
def random_resized_crop_box(width, height, rng, scale=SCALE, ratio=RATIO):
    """(left, top, right, bottom) of a random resized crop: torchvision's algorithm (10 tries of a
    random area and log-uniform aspect ratio, then the centre crop clamped to the ratio range)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * r)))
        h = int(round(math.sqrt(target / r)))
        if 0 < w <= width and 0 < h <= height:
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            return x, y, x + w, y + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def pillow_transform(path, size=224, seed=None):
    """Decode, random resized crop (one bilinear resize of the crop box), flip, normalise, CHW."""
    from PIL import Image
    rng = random.Random(seed)
    with Image.open(path) as im:
        im = im.convert("RGB")
        box = random_resized_crop_box(im.width, im.height, rng)
        im = im.resize((size, size), Image.BILINEAR, box=box)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    x = (np.asarray(im, np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _pillow_job(item):
    path, seed, size = item
    return pillow_transform(path, size, seed)


def run_pillow(files, workers, batch, size, epoch_seed, pool):
    """One epoch (shuffled, last partial batch dropped): (images, seconds, seconds to the first batch)."""
    order = list(files)
    random.Random(epoch_seed).shuffle(order)
    order = order[:len(order) // batch * batch]
    jobs = [(p, epoch_seed * 1000003 + i, size) for i, p in enumerate(order)]
    t0 = time.perf_counter()
    n, first = 0, None
    pending = []
    for x in pool.imap(_pillow_job, jobs, chunksize=4):
        pending.append(x)
        if len(pending) == batch:
            n += np.stack(pending).shape[0]
            pending = []
            first = first or time.perf_counter() - t0
    return n, time.perf_counter() - t0, first


# ----------------------------------------------------------------------------- project pipeline
def project_config(args, workers, classes):
    from src.config import load_config
    return load_config([f"--config_path={args.config}", "--device_target=CPU", f"--batch_size={args.batch}",
                        f"--num_classes={classes}", f"--num_parallel_workers={workers}",
                        f"--image_size={args.image_size}"])


def run_project(train, cfg, seed):
    """One epoch of create_dataset(training=True), numpy batches as train.py reads them."""
    from src.data import create_dataset
    data = create_dataset(train, cfg, True, seed=seed)
    t0 = time.perf_counter()
    n, first = 0, None
    for images, _labels in data.create_tuple_iterator(num_epochs=1, output_numpy=True):
        n += images.shape[0]
        first = first or time.perf_counter() - t0
    return n, time.perf_counter() - t0, first


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="JPEGs to generate (500x375, quality 90)")
    p.add_argument("--classes", type=int, default=4, help="class folders the images are spread over")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per pipeline and worker count (median)")
    p.add_argument("--pipelines", default="project,pillow", help="comma-separated subset of project,pillow")
    p.add_argument("--data_dir", default="", help="folder for the images (default: a temporary folder, removed)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config the project pipeline is built from")
    p.add_argument("--out", default=os.path.join(HERE, "results", "data_pipeline.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        raise SystemExit(f"data_pipeline.py: --workers takes comma-separated integers, got '{args.workers}'") from None
    pipelines = [s.strip() for s in args.pipelines.split(",") if s.strip()]
    if set(pipelines) - {"project", "pillow"} or not pipelines:
        raise SystemExit(f"data_pipeline.py: --pipelines is a subset of project,pillow, got '{args.pipelines}'")
    if not workers or min(workers) < 1 or min(args.repeats, args.classes, args.image_size) < 1:
        raise SystemExit("data_pipeline.py: --workers, --repeats, --classes and --image_size must be >= 1")
    if args.images < args.batch * 2 or args.images < args.classes:
        raise SystemExit(f"data_pipeline.py: --images must be at least 2 batches ({2 * args.batch})")
    if max(workers) > (os.cpu_count() or 1):
        print(f"note: MindSpore caps workers at the CPU count ({os.cpu_count()})")

    tmp = None
    folder = args.data_dir or tempfile.mkdtemp(prefix="data_pipeline_")
    if not args.data_dir:
        tmp = folder
    try:
        t0 = time.perf_counter()
        train = os.path.join(folder, "train")
        files = list_images(train) if os.path.isdir(train) else []
        if len(files) != args.images:
            shutil.rmtree(train, ignore_errors=True)
            write_images(folder, args.images, classes=args.classes)
            files = list_images(train)
        print(f"{len(files)} JPEGs in {train} ({time.perf_counter() - t0:.1f} s)", flush=True)
        sizes = [os.path.getsize(f) for f in files]

        results = {p: {} for p in pipelines}
        for w in workers:
            if "project" in pipelines:
                cfg = project_config(args, w, args.classes)
                run_project(train, cfg, seed=0)                     # warm-up epoch (thread start, page cache)
                runs = [run_project(train, cfg, seed=r + 1) for r in range(args.repeats)]
                results["project"][str(w)] = _summary(runs, args.batch)
            if "pillow" in pipelines:
                with mp.get_context("fork").Pool(w) as pool:
                    run_pillow(files, w, args.batch, args.image_size, 0, pool)
                    runs = [run_pillow(files, w, args.batch, args.image_size, r + 1, pool) for r in range(args.repeats)]
                results["pillow"][str(w)] = _summary(runs, args.batch)
            line = ", ".join(f"{p} {results[p][str(w)]['images_per_s']:.0f} img/s" for p in pipelines)
            print(f"workers {w}: {line}", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    import mindspore as ms
    from PIL import __version__ as pil_version
    result = {
        "config": {"images": len(files), "image_width": 500, "image_height": 375, "jpeg_quality": 90,
                   "mean_file_kb": float(np.mean(sizes) / 1024), "classes": args.classes, "batch": args.batch,
                   "image_size": args.image_size, "repeats": args.repeats, "workers": workers,
                   "source": "sklearn.datasets.load_sample_images (china.jpg, flower.jpg), varied crops",
                   "transforms": "decode, random resized crop (0.08-1, 3/4-4/3), flip 0.5, normalise, CHW, batch",
                   "mindspore": ms.__version__, "pillow": pil_version, "python": platform.python_version(),
                   "cpu_count": os.cpu_count()},
        "pipelines": results,
    }
    if "project" in results and "pillow" in results:
        result["project_over_pillow"] = {
            w: results["project"][w]["images_per_s"] / results["pillow"][w]["images_per_s"] for w in results["project"]}
        result["project_over_pillow_steady"] = {
            w: results["project"][w]["steady_images_per_s"] / results["pillow"][w]["steady_images_per_s"]
            for w in results["project"]}
    print(f"\nTraining augmentation, {len(files)} JPEGs 500x375 -> {args.image_size}, batch {args.batch}, "
          f"median of {args.repeats} epochs (images/s)")
    print(f"{'workers':>7} " + " ".join(f"{p + ' epoch':>14} {p + ' steady':>15}" for p in pipelines))
    for w in workers:
        print(f"{w:>7} " + " ".join(f"{results[p][str(w)]['images_per_s']:14.1f} "
                                    f"{results[p][str(w)]['steady_images_per_s']:15.1f}" for p in pipelines))
    from src.run_log import write_json
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


def _summary(runs, batch):
    """Whole-epoch rate (start-up included, as train.py rebuilds the pipeline every epoch) and the
    steady rate after the first batch (what a long ImageNet epoch sees)."""
    rates = [n / s for n, s, _ in runs]
    steady = [(n - batch) / (s - f) for n, s, f in runs]
    return {"images_per_s": float(np.median(rates)), "steady_images_per_s": float(np.median(steady)),
            "first_batch_s": float(np.median([f for _, _, f in runs])), "rates": rates,
            "images_per_epoch": runs[0][0]}


if __name__ == "__main__":
    main()
