"""The machine a run trained on, recorded at train start in <output_path>/ckpt/environment.json (one
entry per start: a resumed run appends its own), for scripts/model_description.py."""
import datetime
import json
import os
import platform
import subprocess
import sys

from src.run_log import write_json

FILE = "environment.json"


def cpu_info():
    """The CPU's model name and whether it has AVX-512 / AVX2 (/proc/cpuinfo), and the CPU count:
    MindSpore's CPU kernels are 2-3x slower relative to PyTorch's without AVX-512, so every
    benchmark records them beside its times."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if flags and key.strip() == "flags":
                    break
    except OSError:
        pass
    return {"model": model, "avx512f": "avx512f" in flags, "avx2": "avx2" in flags, "cpu_count": os.cpu_count()}


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    return cpu_info()["model"]


def _memory_gb():
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        return round(kb / 2 ** 20, 1)
    except (OSError, StopIteration, ValueError):
        return None


def _gpus():
    """['NVIDIA A100-SXM4-80GB, 81920 MiB', ...] from nvidia-smi, [] without it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def describe_environment(cfg, device_count):
    import mindspore
    return {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "resumed_from": cfg.resume_ckpt or None, "device_target": cfg.device_target,
            "device_count": int(device_count), "gpus": _gpus() if cfg.device_target == "GPU" else [],
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "memory_gb": _memory_gb(),
            "os": platform.platform(), "python": platform.python_version(), "mindspore": mindspore.__version__,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def record_environment(ckpt_dir, cfg, device_count):
    """Append this start's environment to ckpt_dir/environment.json (atomically)."""
    path = os.path.join(ckpt_dir, FILE)
    entries = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                entries = json.load(f)
        except ValueError:
            entries = []
    write_json(path, entries + [describe_environment(cfg, device_count)])
