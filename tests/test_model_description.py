"""scripts/model_description.py (issue 19 item 5): the model zoo's "Model Description" table of a
finished run, checked against the run's own files and the machine, read here independently."""
import datetime
import json
import os

import mindspore as ms
import numpy as np

from tests.helpers import make_image_folder, run_script, tiny_flags

# official/cv/ResNet/README.md's rows, in its order (plus Accuracy, after Loss)
ZOO_ROWS = ["Model Version", "Resource", "Uploaded Date", "MindSpore Version", "Dataset", "Training Parameters",
            "Optimizer", "Loss Function", "outputs", "Loss", "Accuracy", "Speed", "Total time", "Parameters (M)",
            "Checkpoint for Fine tuning", "config"]


def _table(text):
    lines = text.strip().splitlines()
    assert lines[0].split("|")[1:3] == [" Parameters                 ", " CPU "] and set(lines[1]) <= set("|- ")
    return {cells[1].strip(): cells[2].strip() for cells in (line.split("|") for line in lines[2:])}


def test_table_of_a_finished_run(tmp_path):
    data = make_image_folder(str(tmp_path / "data"))
    run = str(tmp_path / "run")
    run_script("train.py", tiny_flags(data, run, epoch_size=2, max_steps_per_epoch=3, log_interval=3), cwd=tmp_path)
    proc = run_script("scripts/model_description.py", [run], cwd=tmp_path)
    table = _table(proc.stdout)
    assert list(table) == ZOO_ROWS
    assert table["Model Version"] == "ResNet-18 iSQRT-COV (d = 16, N = 5)"
    with open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    assert table["Resource"].startswith(f"CPU {cpu}, {os.cpu_count()} cores; Memory ")
    assert table["Uploaded Date"] == f"{datetime.date.today():%m/%d/%Y} (month/day/year)"
    assert table["MindSpore Version"] == ms.__version__
    assert table["Dataset"] == "data: 3 classes, 36 train / 12 val images"  # make_image_folder's 3 x (12 + 4)
    assert table["Training Parameters"].startswith("epoch=2, steps per epoch=3, batch_size = 6, lr=0.05 for a "
                                                   "total batch of 6 (cosine), weight decay 0.0001, 32x32 input, "
                                                   "amp_level O0")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert table["Loss"] == f"{rows[-1]['train_loss']:.6g} (train, epoch 2)"
    best = max(rows, key=lambda r: r["val_top1"])
    assert table["Accuracy"].startswith(f"top-1 {100 * best['val_top1']:.2f}%, top-5 {100 * best['val_top5']:.2f}%")
    assert table["Speed"].startswith(f"{6000 / rows[1]['images_per_sec']:.0f} ms/step (1 device)")
    assert table["Total time"].endswith("s in training steps; the rest: start-up, compilation, evaluation)")
    best_ckpt = os.path.join(run, "ckpt", "best.ckpt")
    weights = ms.load_checkpoint(best_ckpt)
    trained = sum(int(np.prod(v.shape)) for k, v in weights.items()
                  if isinstance(v, ms.Parameter) and "moving_" not in k)
    assert table["Parameters (M)"] == f"{trained / 1e6:.2f}"
    assert table["Checkpoint for Fine tuning"] == f"{os.path.getsize(best_ckpt) / 2 ** 20:.1f}M (.ckpt file)"
    assert table["config"] == os.path.join(run, "ckpt", "config.yaml")
    with open(os.path.join(run, "ckpt", "environment.json")) as f:
        env = json.load(f)
    assert len(env) == 1 and env[0]["device_count"] == 1 and env[0]["resumed_from"] is None


def test_a_folder_that_is_not_a_run_stops_with_one_line(tmp_path):
    proc = run_script("scripts/model_description.py", [str(tmp_path)], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {tmp_path} is not a finished training run: {tmp_path}/ckpt/config.yaml")


def test_readme_shows_the_cpu_demo_runs_table():
    """The README's table is the default demo's (config/digits_demo_config.yaml, the digits), labelled so."""
    from src.config import load_config
    from tests.helpers import ROOT
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    intro, rest = text.split("| Parameters                 | CPU |", 1)
    assert "The CPU demo run's (`python train.py`)" in intro.rstrip().rsplit("\n\n", 1)[-1]
    table = _table("| Parameters                 | CPU |" + rest.split("\n\n", 1)[0])
    assert list(table) == ZOO_ROWS
    demo = load_config([])
    assert (demo.arch, demo.head, demo.demo_dataset) == ("resnet18", "isqrt_cov", "digits")
    assert table["Model Version"] == f"ResNet-18 iSQRT-COV (d = {demo.dimension_reduction}, N = {demo.iter_num})"
    assert table["Dataset"] == "digits: 10 classes, 1,437 train / 360 val images"  # scikit-learn's 1797 digits
    assert table["Training Parameters"].startswith(
        f"epoch={demo.epoch_size}, steps per epoch={1437 // demo.batch_size}, batch_size = {demo.batch_size}, "
        f"lr={demo.lr:g} for a total batch of {demo.lr_base_batch} ({demo.lr_schedule}), weight decay "
        f"{demo.weight_decay:g}, {demo.image_size}x{demo.image_size} input, amp_level O0")
    assert table["config"] == "output/ckpt/config.yaml"
