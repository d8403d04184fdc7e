"""The MindSpore model zoo's "Model Description" table (official/cv/ResNet/README.md, "Evaluation
Performance") of a finished run, from the files the run wrote: ckpt/config.yaml, metrics.jsonl,
logs/rank_0.log, ckpt/environment.json and ckpt/best.ckpt."""
import datetime
import json
import os
import re
import statistics

from src.errors import UserError

ARCH_NAMES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50", "resnet101": "ResNet-101",
              "resnet152": "ResNet-152", "vgg16_bn": "VGG-16-BN"}
HEAD_NAMES = {"isqrt_cov": "iSQRT-COV", "gap": "GAP", "bcnn": "B-CNN", "cbp": "CBP"}
# train.py's first line of a run (src/engine.py): network, size, steps, devices, batch
_HEADER = re.compile(r"\[rank 0\] \S+ \S+: [\d,]+ parameters, (\d+) classes, (\d+) steps/epoch x \d+ epochs, "
                     r"(\d+) device\(s\) x batch (\d+)")
_VAL = re.compile(r"\[rank 0\] epoch \d+: val top-1 .*\((\d+) images\)")


def _duration(seconds):
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


def _read_run(run):
    paths = {"config": os.path.join(run, "ckpt", "config.yaml"), "metrics": os.path.join(run, "metrics.jsonl"),
             "log": os.path.join(run, "logs", "rank_0.log"),
             "environment": os.path.join(run, "ckpt", "environment.json"),
             "checkpoint": os.path.join(run, "ckpt", "best.ckpt")}
    missing = [p for k, p in paths.items() if k != "environment" and not os.path.isfile(p)]
    if missing:
        raise UserError(f"{run} is not a finished training run: {', '.join(missing)} missing (RUN is train.py's "
                        "--output_path)")
    from src.config import load_config
    cfg = load_config(["--config_path", paths["config"]])
    with open(paths["metrics"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(paths["log"]) as f:
        log = f.read()
    env = []
    if os.path.isfile(paths["environment"]):  # older runs did not record it
        with open(paths["environment"]) as f:
            env = json.load(f)
    headers = _HEADER.findall(log)
    if not rows or not headers:
        raise UserError(f"{run} has no finished epoch (metrics.jsonl, logs/rank_0.log): nothing to describe")
    return paths, cfg, rows, log, env, [int(v) for v in headers[-1]]


def _count_images(folder):
    from src.data.folder import is_image_file
    if not os.path.isdir(folder):
        return None
    return sum(1 for c in os.scandir(folder) if c.is_dir() for e in os.scandir(c.path) if e.is_file()
               and is_image_file(e.name))


def _parameters(cfg):
    """Trainable parameters of the run's network (BatchNorm statistics excluded), in millions."""
    from src.factory import build_network
    from src.models import count_params
    return count_params(build_network(cfg)) / 1e6


def describe_run(run):
    """([(row name, value)] of the model zoo's table, the device column's title) for the run in ``run``."""
    from src.precision import resolve_amp_level
    paths, cfg, rows, log, env, (classes, steps, devices, batch) = _read_run(run)
    unknown = "not recorded (ckpt/environment.json absent)"
    first, last = (env[0], env[-1]) if env else ({}, {})
    arch, head = ARCH_NAMES.get(cfg.arch, cfg.arch), HEAD_NAMES.get(cfg.head, cfg.head)
    version = f"{arch} {head}"
    if cfg.head == "isqrt_cov":
        version += f" (d = {cfg.dimension_reduction or 'none'}, N = {cfg.iter_num})"
    memory = f"; Memory {first['memory_gb']}G" if first.get("memory_gb") else ""
    cpu = f"CPU {first['cpu_model']}, {first['cpu_count']} cores{memory}; OS {first['os']}" if env else unknown
    if cfg.device_target == "CPU":
        resource = cpu + (f"; {devices} processes" if devices > 1 else "")
    else:
        resource = f"{devices} x {first['gpus'][0] if first.get('gpus') else cfg.device_target}; {cpu}"
    # the run's start (its first train.py), else when its configuration was written
    started = datetime.datetime.fromisoformat(first["started"]) if env else \
        datetime.datetime.fromtimestamp(os.path.getmtime(paths["config"])).astimezone()
    val = _VAL.findall(log)
    train_images = _count_images(os.path.join(cfg.data_path, "train"))
    dataset = f"{os.path.basename(os.path.normpath(cfg.data_path))}: {classes} classes, " + \
        (f"{train_images:,} train" if train_images is not None else f"{steps * batch * devices:,} train per epoch") + \
        (f" / {int(val[-1]):,} val images" if val else " images")
    schedule = f"{cfg.lr_schedule}" + (f" /{1 / cfg.lr_gamma:g} at {cfg.lr_milestones}"
                                           if cfg.lr_schedule == "step" and cfg.lr_milestones else "")
    params = (f"epoch={len(rows)}, steps per epoch={steps}, batch_size = {batch}" +
              (f" x {devices} devices" if devices > 1 else "") + f", lr={cfg.lr:g} for a total batch of "
              f"{cfg.lr_base_batch} ({schedule}), weight decay {cfg.weight_decay:g}, {cfg.image_size}x"
              f"{cfg.image_size} input, amp_level {resolve_amp_level(cfg)}")
    loss = "Softmax Cross Entropy" + (f", label smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else "")
    global_batch = batch * devices
    timed = rows[1:] if len(rows) > 1 else rows  # epoch 1 includes the graph compilation
    ms_per_step = statistics.median(1000 * global_batch / r["images_per_sec"] for r in timed)
    speed = f"{ms_per_step:.0f} ms/step ({devices} {'device' if devices == 1 else 'devices'}), " + \
        f"{statistics.median(r['images_per_sec'] for r in timed):.0f} img/s" + \
        (" (epochs 2 on: epoch 1 compiles)" if len(rows) > 1 else "")
    training = sum(r["epoch_time"] for r in rows)
    total = _duration(training) + " in training steps"
    if len(env) == 1:  # one start: wall time from train.py's start to the last epoch's metrics
        end = datetime.datetime.fromtimestamp(os.path.getmtime(paths["metrics"]), tz=started.tzinfo)
        total = f"{_duration((end - started).total_seconds())} ({total}; the rest: start-up, compilation, evaluation)"
    best = max((r for r in rows if r.get("val_top1") is not None), key=lambda r: r["val_top1"], default=None)
    accuracy = f"top-1 {100 * best['val_top1']:.2f}%, top-5 {100 * best['val_top5']:.2f}% (val, epoch " \
               f"{best['epoch']}, single centre crop{' + flip' if cfg.eval_flip_average else ''})" if best else "-"
    return [
        ("Model Version", version),
        ("Resource", resource),
        ("Uploaded Date", f"{started:%m/%d/%Y} (month/day/year)"),
        ("MindSpore Version", last.get("mindspore", unknown)),
        ("Dataset", dataset),
        ("Training Parameters", params),
        ("Optimizer", f"Momentum ({cfg.momentum:g})"),
        ("Loss Function", loss),
        ("outputs", "probability"),
        ("Loss", f"{rows[-1]['train_loss']:.6g} (train, epoch {rows[-1]['epoch']})"),
        ("Accuracy", accuracy),
        ("Speed", speed),
        ("Total time", total),
        ("Parameters (M)", f"{_parameters(cfg):.2f}"),
        ("Checkpoint for Fine tuning", f"{os.path.getsize(paths['checkpoint']) / 2 ** 20:.1f}M (.ckpt file)"),
        ("config", paths["config"]),
    ], cfg.device_target


def format_table(rows, column):
    """The rows as the model zoo's Markdown table: | Parameters | <device> |."""
    width = max(len(name) for name, _ in rows + [("Parameters", "")])
    lines = [f"| {'Parameters':<{width}} | {column} |", f"| {'-' * width} | {'-' * max(len(column), 3)} |"]
    return "\n".join(lines + [f"| {name:<{width}} | {value} |" for name, value in rows])
