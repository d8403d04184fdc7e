"""Data-pipeline throughput of the training augmentation on CPU, and the cost of listing a big folder (not a test).

Throughput: decode, random resized crop to 224 (area 0.08-1, aspect 3/4-4/3), horizontal flip, CHW,
uint8 batches (the network normalises on the device), over a folder of realistic JPEGs, per worker
count, each pipeline serving several epochs as training does:
  unprotected     ImageFolderDataset (MindSpore's shuffle) + the project's ops: no check of the files
  project         src.data.FolderPipeline as train.py runs it: the files checked once beforehand (timed
                  apart, "check"), then read in C++ in the order a sampler hands over each epoch
  per_read_check  the previous protection: every read through a Python hook (ImageFolderDataset's
                  decrypt) that checks the bytes under the GIL, every epoch
  pillow          the same transforms in plain Pillow + NumPy in a process pool (what a PyTorch
                  DataLoader does)
The images: real photos (scikit-learn's sample images china.jpg and flower.jpg), cut into varied
crops, resized to 500x375 (an average ImageNet photo) and saved as JPEG quality 90.

Listing ("scan", --scan_files, default 100000 tiny JPEGs in 1000 class folders under /tmp, kept for
the next run): the listing and the check train.py does once per run, against the per-epoch rebuild
of the previous code (a new ImageFolderDataset, which lists the folder again, per epoch) and the
per-epoch cost of the one pipeline now, both reading 2 batches; the one pipeline computes the next
epoch's order (timed apart) and reads its first batches while the current epoch ends.

    python bench/data_pipeline.py                               # the full run (quiet machine)
    python bench/data_pipeline.py --images 64 --workers 1 --repeats 1 --scan_files 2000 --out /tmp/d.json
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
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
PIPELINES = ("unprotected", "project", "per_read_check", "pillow")


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
    """Decode, random resized crop (one bilinear resize of the crop box), flip, CHW uint8 (the
    project's pipeline also hands uint8 to the device, which normalises)."""
    from PIL import Image
    rng = random.Random(seed)
    with Image.open(path) as im:
        im = im.convert("RGB")
        box = random_resized_crop_box(im.width, im.height, rng)
        im = im.resize((size, size), Image.BILINEAR, box=box)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.ascontiguousarray(np.asarray(im, np.uint8).transpose(2, 0, 1))


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


# ----------------------------------------------------------------------------- MindSpore pipelines
def project_config(args, workers, classes, batch=None):
    from src.config import load_config
    return load_config([f"--config_path={args.config}", "--device_target=CPU", f"--batch_size={batch or args.batch}",
                        f"--num_classes={classes}", f"--num_parallel_workers={workers}",
                        f"--image_size={args.image_size}"])


def _checked_read(path):
    """The previous protection: ImageFolderDataset's decrypt hook, reading and checking every file."""
    from src.data import image_problem
    with open(path, "rb") as f:
        data = f.read()
    return data if image_problem(data) is None else b""


def _epochs(kind, files, cfg, seed):
    """A generator of epochs (each an iterator of numpy batches) of one pipeline that lives for the run."""
    import mindspore.dataset as ds
    from src.data import FolderPipeline, data_workers, train_ops
    from src.data.folder import image_extensions_all_cases
    if kind == "project":
        pipe = FolderPipeline(files, cfg, True, {}, seed=seed)
        while True:
            yield pipe.epoch(output_numpy=True)
    w = data_workers(cfg.num_parallel_workers)
    ds.config.set_seed(seed)
    data = ds.ImageFolderDataset(files.split_dir, num_parallel_workers=max(1, w // 2), shuffle=True,
                                 extensions=image_extensions_all_cases(),
                                 class_indexing={c: i for i, c in enumerate(files.classes)},
                                 decrypt=_checked_read if kind == "per_read_check" else None)
    data = data.map(train_ops(cfg), input_columns="image", num_parallel_workers=w)
    data = data.batch(int(cfg.batch_size), drop_remainder=True, num_parallel_workers=max(1, w // 4))
    it = data.create_tuple_iterator(num_epochs=-1, output_numpy=True)
    while True:
        yield it


def run_mindspore(kind, files, cfg, epochs, seed):
    """One warm-up epoch, then ``epochs`` timed ones: [(images, seconds, seconds to the first batch)]."""
    source, runs = _epochs(kind, files, cfg, seed), []
    for e in range(epochs + 1):
        t0 = time.perf_counter()
        n, first = 0, None
        for images, _labels in next(source):
            n += images.shape[0]
            first = first or time.perf_counter() - t0
        if e:
            runs.append((n, time.perf_counter() - t0, first))
    source.close()
    return runs


# ----------------------------------------------------------------------------- listing a big folder
def write_tiny_folder(folder, count, classes=1000):
    """``count`` 16x16 JPEGs (about 850 bytes) in ``classes`` class folders under folder/train."""
    from PIL import Image
    train = os.path.join(folder, "train")
    marker = os.path.join(folder, f".complete_{count}_{classes}")
    if os.path.exists(marker):
        return train
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        path = os.path.join(folder, "blob.jpg")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path, quality=90)
        blobs.append(open(path, "rb").read())
    os.remove(os.path.join(folder, "blob.jpg"))
    for i in range(count):
        d = os.path.join(train, f"n{i % classes:08d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"n{i % classes:08d}_{i // classes:05d}.JPEG"), "wb") as f:
            f.write(blobs[i % 16])
    open(marker, "w").close()
    return train


def scan_benchmark(args):
    """Seconds: the listing and the check (once per run), the previous per-epoch rebuild and the
    per-epoch cost now (medians of --repeats + 2 epochs reading 2 batches of 16 each)."""
    import mindspore.dataset as ds
    import mindspore.dataset.vision as vision
    from src.data import FileList, FolderPipeline, check_files
    from src.data.folder import image_extensions_all_cases
    folder = args.scan_dir or os.path.join(tempfile.gettempdir(), "isqrt_cov_bench_scan")
    t0 = time.perf_counter()
    train = write_tiny_folder(folder, args.scan_files)
    print(f"{args.scan_files} tiny JPEGs in {train} ({time.perf_counter() - t0:.1f} s)", flush=True)
    t0 = time.perf_counter()
    files = FileList(train)
    scan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bad = check_files(files.paths)
    check_s = time.perf_counter() - t0
    cfg = project_config(args, 2, len(files.classes), batch=16)
    cfg.image_size, reps = 16, args.repeats + 2
    before = []
    for r in range(reps):  # the previous code: a new pipeline (which lists the folder again) every epoch
        t0 = time.perf_counter()
        ds.config.set_seed(r)
        data = ds.ImageFolderDataset(train, num_parallel_workers=2, shuffle=True, extensions=image_extensions_all_cases(),
                                     class_indexing={c: i for i, c in enumerate(files.classes)})
        data = data.map([vision.Decode(), vision.HWC2CHW()], input_columns="image", num_parallel_workers=2).batch(16)
        it = data.create_tuple_iterator(num_epochs=1, output_numpy=True)
        next(it), next(it)
        before.append(time.perf_counter() - t0)
        it.stop()
    cfg.train_transform, cfg.train_resize, cfg.hflip = "resize_center_crop", 16, False
    pipe, now = FolderPipeline(files, cfg, True, {}, max_batches=2), []
    for e in range(reps + 1):  # the one pipeline: each epoch asks the sampler for a new order
        t0 = time.perf_counter()
        sum(1 for _ in pipe.epoch(output_numpy=True))
        if e:
            now.append(time.perf_counter() - t0)
    pipe.close()
    order = []
    for e in range(reps):  # the work behind a new epoch now, which the pipeline does ahead of it
        t0 = time.perf_counter()
        pipe.order.indices(e)
        order.append(time.perf_counter() - t0)
    return {"files": len(files), "classes": len(files.classes), "refused": int(np.count_nonzero(bad)),
            "scan_s": scan_s, "check_s": check_s, "check_us_per_file": 1e6 * check_s / len(files),
            "rebuild_per_epoch_before_s": float(np.median(before)), "per_epoch_now_s": float(np.median(now)),
            "order_per_epoch_s": float(np.median(order)),
            "before_runs_s": before, "now_runs_s": now, "batches_per_epoch_read": 2}


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400, help="JPEGs to generate (500x375, quality 90)")
    p.add_argument("--classes", type=int, default=4, help="class folders the images are spread over")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5, help="rounds: every pipeline in turn, in a rotating order")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per pipeline and round (after one warm-up)")
    p.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated subset of {','.join(PIPELINES)}")
    p.add_argument("--data_dir", default="", help="folder for the images (default: a temporary folder, removed)")
    p.add_argument("--scan_files", type=int, default=100000, help="files of the listing benchmark (0: skip it)")
    p.add_argument("--scan_dir", default="", help="its folder (default: <tmp>/isqrt_cov_bench_scan, kept)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config the project pipeline is built from")
    p.add_argument("--out", default=os.path.join(HERE, "results", "data_pipeline.json"))
    return p.parse_args(argv)


def _summary(runs, batch):
    """Epoch rate (its start and end included, as training sees them) and the rate after the first batch."""
    rates = [n / s for n, s, _ in runs]
    steady = [(n - batch) / (s - f) for n, s, f in runs]
    return {"images_per_s": float(np.median(rates)), "steady_images_per_s": float(np.median(steady)),
            "first_batch_s": float(np.median([f for _, _, f in runs])), "rates": rates,
            "images_per_epoch": runs[0][0]}


def throughput(args, workers, pipelines, files):
    results = {p: {} for p in pipelines}
    for w in workers:
        cfg = project_config(args, w, args.classes)
        runs = {p: [] for p in pipelines}
        for r in range(args.repeats):
            for p in pipelines[r % len(pipelines):] + pipelines[:r % len(pipelines)]:
                if p == "pillow":
                    with mp.get_context("fork").Pool(w) as pool:
                        runs[p] += [run_pillow(files.paths, w, args.batch, args.image_size, 100 * r + e, pool)
                                    for e in range(args.epochs + 1)][1:]
                else:
                    runs[p] += run_mindspore(p, files, cfg, args.epochs, 100 * r)
        for p in pipelines:
            results[p][str(w)] = _summary(runs[p], args.batch)
        print(f"workers {w}: " + ", ".join(f"{p} {results[p][str(w)]['images_per_s']:.0f} img/s" for p in pipelines),
              flush=True)
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        raise SystemExit(f"data_pipeline.py: --workers takes comma-separated integers, got '{args.workers}'") from None
    pipelines = [s.strip() for s in args.pipelines.split(",") if s.strip()]
    if set(pipelines) - set(PIPELINES) or not pipelines:
        raise SystemExit(f"data_pipeline.py: --pipelines is a subset of {','.join(PIPELINES)}, got '{args.pipelines}'")
    if not workers or min(workers) < 1 or min(args.repeats, args.epochs, args.classes, args.image_size) < 1:
        raise SystemExit("data_pipeline.py: --workers, --repeats, --epochs, --classes and --image_size must be >= 1")
    if args.images < args.batch * 2 or args.images < args.classes:
        raise SystemExit(f"data_pipeline.py: --images must be at least 2 batches ({2 * args.batch})")
    if max(workers) > (os.cpu_count() or 1):
        print(f"note: workers are capped at the CPU count ({os.cpu_count()})")
    from src.data import FileList, check_files

    folder = args.data_dir or tempfile.mkdtemp(prefix="data_pipeline_")
    try:
        t0 = time.perf_counter()
        train = os.path.join(folder, "train")
        if not os.path.isdir(train) or len(FileList(train)) != args.images:
            shutil.rmtree(train, ignore_errors=True)
            write_images(folder, args.images, classes=args.classes)
        files = FileList(train)
        print(f"{len(files)} JPEGs in {train} ({time.perf_counter() - t0:.1f} s)", flush=True)
        sizes = [os.path.getsize(f) for f in files.paths]
        t0 = time.perf_counter()
        assert not check_files(files.paths).any()
        check_s = time.perf_counter() - t0
        results = throughput(args, workers, pipelines, files)
    finally:
        if not args.data_dir:
            shutil.rmtree(folder, ignore_errors=True)
    scan = scan_benchmark(args) if args.scan_files > 0 else None

    import mindspore as ms
    from PIL import __version__ as pil_version
    from src.run_env import cpu_info
    result = {
        "config": {"images": len(files), "image_width": 500, "image_height": 375, "jpeg_quality": 90,
                   "mean_file_kb": float(np.mean(sizes) / 1024), "classes": args.classes, "batch": args.batch,
                   "image_size": args.image_size, "repeats": args.repeats, "epochs": args.epochs, "workers": workers,
                   "source": "sklearn.datasets.load_sample_images (china.jpg, flower.jpg), varied crops",
                   "transforms": "decode, random resized crop (0.08-1, 3/4-4/3), flip 0.5, CHW, uint8 batch",
                   "mindspore": ms.__version__, "pillow": pil_version, "python": platform.python_version(),
                   "cpu": cpu_info()},
        "pipelines": results,
        "check": {"files": len(files), "seconds": check_s, "us_per_file": 1e6 * check_s / len(files)},
        "scan": scan,
    }
    base = results.get("unprotected")
    if base:
        result["over_unprotected"] = {p: {w: results[p][w]["images_per_s"] / base[w]["images_per_s"] for w in base}
                                      for p in results if p != "unprotected"}
        # the check once per run, as a fraction of one epoch of these images at the unprotected rate
        result["check"]["fraction_of_one_epoch"] = {w: check_s * base[w]["images_per_s"] / len(files) for w in base}
    print(f"\nTraining augmentation, {len(files)} JPEGs 500x375 -> {args.image_size}, batch {args.batch}, "
          f"median of {args.repeats} x {args.epochs} epochs (images/s)")
    print(f"{'workers':>7} " + " ".join(f"{p:>15}" for p in pipelines))
    for w in workers:
        print(f"{w:>7} " + " ".join(f"{results[p][str(w)]['images_per_s']:15.1f}" for p in pipelines))
    print(f"check once per run: {result['check']['us_per_file']:.0f} us per file")
    if scan:
        print(f"{scan['files']} files: listing {scan['scan_s']:.2f} s and check {scan['check_s']:.2f} s once per run; "
              f"per epoch (2 batches read) {scan['rebuild_per_epoch_before_s']:.3f} s before, "
              f"{scan['per_epoch_now_s']:.3f} s now (a new order: {scan['order_per_epoch_s']:.3f} s, done ahead)")
    from src.run_log import write_json
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
