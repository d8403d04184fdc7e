"""The DropCov and iSICE heads through train.py then eval.py (subprocesses) on real JPEG images."""
import json
import os

import mindspore as ms
import numpy as np
import pytest

from tests.helpers import make_image_folder, run_script, tiny_flags


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")))


@pytest.mark.parametrize("head", ["dropcov", "isice"])
def test_train_then_eval(data, tmp_path, head):
    """ResNet-18 at 64 px: DropCov's layer4 at stride 1 (4x4 maps), iSICE's at stride 2 (2x2: a
    rank-deficient covariance, as 7x7 maps with 256 channels are)."""
    out = str(tmp_path / "out")
    flags = tiny_flags(data, out, head=head, image_size=64, eval_resize=64, epoch_size=1)
    run_script("train.py", flags, cwd=tmp_path)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1]
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in rows)
    params = ms.load_checkpoint(os.path.join(out, "ckpt", "latest.ckpt"))
    assert params["layer_reduce.weight"].shape == (16, 512, 1, 1)
    assert ("eca_layer.conv.weight" in params) == (head == "dropcov")
    run_script("eval.py", tiny_flags(data, out, head=head, image_size=64, eval_resize=64), cwd=tmp_path)
    metrics = json.load(open(os.path.join(out, "eval_metrics.json")))
    best = rows[0]  # best.ckpt, evaluated again
    assert metrics["num_images"] == 12
    assert metrics["top1"] == pytest.approx(best["val_top1"], abs=1e-9)  # DropCov's eval is deterministic
    assert metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-4)
