"""README's "Finetuning on CUB in five commands" (issue 19 item 6), run as the README writes them on a
tiny CUB archive in the published layout: only paths and sizes are substituted (ResNet-18 without the
download, 32 px, 1 epoch, CPU), so the README cannot drift from what works."""
import os
import re
import shlex
import subprocess
import sys

from tests.archives import CUB_CLASSES, make_cub
from tests.helpers import ENV, ROOT

TINY_TRAIN = ["--arch=resnet18", "--device_target=CPU", "--image_size=32", "--train_resize=32", "--eval_resize=32",
              "--batch_size=4", "--lr_base_batch=4", "--epoch_size=1", "--num_classes=3", "--dimension_reduction=16",
              "--num_parallel_workers=1"]


def readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Finetuning on CUB in five commands\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def _substitute(command, replacements):
    for old, new in replacements.items():
        assert old in command, f"README command no longer holds {old!r}: {command}"
        command = command.replace(old, new)
    return command


def _run(argv, cwd):
    if argv[0] == "python":
        argv = [sys.executable] + [os.path.join(ROOT, argv[1]) if argv[1].endswith(".py") else argv[1]] + argv[2:]
    proc = subprocess.run(argv, cwd=str(cwd), env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_five_commands_run_end_to_end(tmp_path):
    commands = readme_commands()
    assert [shlex.split(c)[:2] for c in commands] == [
        ["python", "scripts/prepare_dataset.py"], ["python", "-c"], ["python", "train.py"], ["python", "eval.py"],
        ["python", "predict.py"]]
    where = make_cub(str(tmp_path / "archive"))
    archive = {"/path/to/CUB_200_2011": str(tmp_path / "archive" / "CUB_200_2011")}
    data = {"/path/to/cub": str(tmp_path / "cub")}
    prepare, weights, train, evaluate, predict = commands

    out = _run(shlex.split(_substitute(prepare, dict(archive, **data))), tmp_path)
    assert "  train/ 9 images, 3 classes" in out and "  val/ 6 images, 3 classes" in out
    # the weights: mindcv's ResNet-18 as built (nothing to download here), saved as the README saves it
    out = _run(shlex.split(_substitute(weights, {"'resnet50'": "'resnet18'", "pretrained=True": "pretrained=False"})),
               tmp_path)
    assert os.path.isfile(tmp_path / "resnet50_imagenet.ckpt")
    out = _run(shlex.split(_substitute(train, dict(data, **{"./config/": os.path.join(ROOT, "config") + "/"})))
               + TINY_TRAIN, tmp_path)
    assert "resnet50_imagenet.ckpt (mindcv-resnet names): 100 parameters loaded" in out
    assert "resnet18 isqrt_cov: " in out and ", 3 classes, 2 steps/epoch x 1 epochs" in out
    out = _run(shlex.split(_substitute(evaluate, data)), tmp_path)
    assert re.search(r"top-1 [\d.]+%", out) and os.path.isfile(tmp_path / "cub" / "eval_metrics.json")
    out = _run(shlex.split(_substitute(predict, data)), tmp_path)
    albatrosses = sorted(f for split, cls, f in where if split == "val" and cls == CUB_CLASSES[0])
    assert len(albatrosses) == 2
    for name in albatrosses:
        line = next(x for x in out.splitlines() if name in x)
        assert all(c in line for c in CUB_CLASSES), line  # top 3 of 3 classes, by name
