"""Shared test utilities: a tiny ImageNet-style folder and subprocess runners for the CLIs."""
import os
import signal
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, GLOG_v="3", PYTHONUNBUFFERED="1")
HOOKED_TRAIN = os.path.join("tests", "hooks.py")  # train.py with the test hooks of tests/hooks.py


def make_image_folder(root, num_classes=3, train_per_class=12, val_per_class=4, size=32, seed=0):
    """JPEGs whose class is a colour plus noise: learnable in a few steps, but not trivially constant."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(num_classes, 3))
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                img = colours[c] + rng.normal(0, 25, size=(size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    os.path.join(folder, f"{i:03d}.jpg"), quality=90)
    return root


def tiny_flags(data, output, **overrides):
    """Flags for a small, fast iSQRT-COV ResNet-18 run on make_image_folder's data."""
    flags = dict(config_path=os.path.join(ROOT, "config", "digits_demo_config.yaml"), data_path=data,
                 output_path=output, demo_dataset="", num_classes=3, image_size=32, eval_resize=32,
                 batch_size=6, dimension_reduction=16, epoch_size=2, num_parallel_workers=1, log_interval=1,
                 warmup_epochs=0, lr=0.05, lr_base_batch=6, keep_checkpoint_max=1)
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def run_script(script, args, cwd, timeout=600, launcher=(), env=None, check=True):
    """Run one of the repo's CLIs from ``cwd`` (MindSpore drops debug files in the working folder);
    on an unexpected exit code show its output in the failure."""
    cmd = list(launcher) + ([sys.executable] if not launcher or launcher[0] == "mpirun" else []) + \
        [os.path.join(ROOT, script)] + list(args)
    proc = subprocess.run(cmd, cwd=str(cwd), env=dict(ENV, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def stop_when_logged(proc, text, sig=signal.SIGTERM, timeout=300):
    """Send ``sig`` to ``proc`` (a Popen with text stdout) once a line of its output holds ``text``;
    returns the whole output after it exits."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            proc.send_signal(sig)
            break
    return "".join(lines) + proc.communicate(timeout=timeout)[0]
