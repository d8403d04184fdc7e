"""End to end: train.py then eval.py as subprocesses on a tiny folder; resume after SIGTERM."""
import json
import os
import shutil
import signal
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from tests.helpers import ENV, ROOT, make_image_folder, run_script, tiny_flags


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One 2-epoch run shared by the tests that only read it (or copy it before changing it)."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    run_script("train.py", tiny_flags(data, out), cwd=os.path.dirname(out))
    return out


def _weights(path):
    params = ms.load_checkpoint(path)
    return {k: v.asnumpy() for k, v in params.items() if not k.startswith(("moments.", "learning_rate"))
            and hasattr(v, "asnumpy") and v.asnumpy().size > 1}


def test_train_then_eval_writes_everything(data, trained, tmp_path):
    out = trained
    ckpt = os.path.join(out, "ckpt")
    for name in ("latest.ckpt", "best.ckpt", "epoch_002.ckpt", "config.yaml", "class_names.json"):
        assert os.path.isfile(os.path.join(ckpt, name)), name
    assert not os.path.exists(os.path.join(ckpt, "epoch_001.ckpt"))  # keep_checkpoint_max=1
    assert json.load(open(os.path.join(ckpt, "class_names.json"))) == ["class_0", "class_1", "class_2"]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite(r["train_loss"]) and 0 <= r["val_top1"] <= r["val_top5"] <= 1
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000
    log = open(os.path.join(out, "logs", "rank_0.log")).read()
    assert "img/s" in log and "eta" in log and "val top-1" in log

    ev = run_script("eval.py", tiny_flags(data, out), cwd=tmp_path)
    metrics = json.load(open(os.path.join(out, "eval_metrics.json")))
    assert {"top1", "top5", "loss", "num_images"} <= set(metrics)
    assert metrics["num_images"] == 12
    best = max(rows, key=lambda r: r["val_top1"])  # best.ckpt is the epoch with the best top-1
    assert metrics["top1"] == pytest.approx(best["val_top1"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-4)
    assert "parameters" in ev.stdout and "top-1" in ev.stdout


def test_sigterm_saves_and_resume_matches_uninterrupted_run(data, tmp_path):
    # Deterministic crops: a resumed run reads the same images in the same order, skipping the steps
    # done, but draws its random crops afresh (src/data/pipeline.py), so random ones would differ.
    flags = dict(epoch_size=2, lr=0.02, train_transform="resize_center_crop", train_resize=32)
    full = str(tmp_path / "full")
    run_script("train.py", tiny_flags(data, full, **flags), cwd=tmp_path)

    cut = str(tmp_path / "cut")
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + tiny_flags(data, cut, **flags)
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:  # stop it inside the first epoch, right after its second step
        lines.append(line)
        if "epoch 1/2 step 2/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
    assert "--resume_ckpt=" in rest
    latest = os.path.join(cut, "ckpt", "latest.ckpt")
    meta = ms.load_checkpoint(latest)
    assert int(meta["epoch"].asnumpy()) == 0 and 2 <= int(meta["step_in_epoch"].asnumpy()) < 6

    other_batch = run_script("train.py", tiny_flags(data, cut, resume_ckpt=latest, batch_size=4, **flags),
                             cwd=tmp_path, check=False)
    assert other_batch.returncode == 2 and other_batch.stderr.startswith("error: ") and "Traceback" not in other_batch.stderr
    assert "stopped inside epoch 1" in other_batch.stderr and "--batch_size" in other_batch.stderr

    run_script("train.py", tiny_flags(data, cut, resume_ckpt=latest, **flags), cwd=tmp_path)
    a, b = _weights(os.path.join(full, "ckpt", "latest.ckpt")), _weights(latest)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_resume_with_a_longer_or_shorter_epoch_size(data, tmp_path):
    """The schedule comes from the current config: a finished 2-epoch run extends to 3, and a run
    already past the new end says so and exits 0. The learning-rate arrays of the checkpoint (of
    another length) are not restored."""
    out = str(tmp_path / "out")
    run_script("train.py", tiny_flags(data, out, epoch_size=2, lr_schedule="step", lr_milestones="1"), cwd=tmp_path)
    latest = os.path.join(out, "ckpt", "latest.ckpt")
    longer = run_script("train.py", tiny_flags(data, out, epoch_size=3, lr_schedule="step", lr_milestones="1",
                                               resume_ckpt=latest), cwd=tmp_path)
    assert "at epoch 3 step 0" in longer.stdout and "epoch 3/3 step 6/6" in longer.stdout
    assert "epoch 2/3" not in longer.stdout
    assert "lr 0.005000" in longer.stdout  # step schedule: the lr after milestone 1, continued
    assert int(ms.load_checkpoint(latest)["epoch"].asnumpy()) == 2
    shorter = run_script("train.py", tiny_flags(data, out, epoch_size=2, resume_ckpt=latest), cwd=tmp_path)
    assert "has finished epoch 3 and epoch_size is 2: nothing to train" in shorter.stdout


def test_export_mindir_gives_the_checkpoint_logits(data, trained, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(trained, out)
    run_script("export.py", tiny_flags(data, out), cwd=tmp_path)
    mindir = os.path.join(out, "resnet18_isqrt_cov.mindir")
    assert os.path.isfile(mindir)
    onnx = run_script("export.py", tiny_flags(data, out, file_format="ONNX"), cwd=tmp_path, check=False)
    # MindSpore 2.8's ONNX exporter has no converter for the backbone's max pooling: one line, exit 2 (ConfigError).
    assert onnx.returncode == 2 and onnx.stderr.strip().splitlines()[-1] == (
        "error: MindSpore could not export this network as ONNX (Can not find key MaxPool3DWithArgmax in convert "
        "map. Exporting MaxPool3DWithArgmax operator is not yet supported.); MINDIR is supported")

    from src.checkpoint import load_network
    from src.config import load_config
    from src.models import create_model
    demo = load_config([])  # tiny_flags' config file: the run's mean and std, which the model applies to uint8 input
    net = create_model("resnet18", "isqrt_cov", 3, dimension_reduction=16, mean=demo.mean, std=demo.std)
    load_network(net, os.path.join(out, "ckpt", "best.ckpt"))
    net.set_train(False)
    x = ms.Tensor(np.random.default_rng(0).integers(0, 256, size=(1, 3, 32, 32)).astype(np.uint8))
    exported = ms.nn.GraphCell(ms.load(mindir))
    np.testing.assert_allclose(exported(x).asnumpy(), net(x).asnumpy(), rtol=1e-4, atol=1e-5)


def test_eval_and_export_use_the_config_saved_with_the_checkpoint(data, trained, tmp_path):
    """eval.py / export.py given only the checkpoint (and the data) rebuild the run's network from
    RUN/ckpt/config.yaml and reproduce its best top-1; launch keys are not inherited; flags win."""
    run = str(tmp_path / "run")
    shutil.copytree(trained, run)
    saved = os.path.join(run, "ckpt", "config.yaml")
    # As if the run had been launched by mpirun on 8 GPUs (device_target kept: this machine has no GPU).
    text = open(saved).read()
    for key, value in (("run_distribute", "true"), ("device_num", "8"), ("device_id", "3")):
        assert f"\n{key}: " in text
        text = "\n".join(f"{key}: {value}" if line.startswith(f"{key}: ") else line for line in text.splitlines())
    open(saved, "w").write(text + "\n")
    best_ckpt = os.path.join(run, "ckpt", "best.ckpt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    ev = run_script("eval.py", [f"--checkpoint_file_path={best_ckpt}", f"--data_path={data}"], cwd=elsewhere)
    assert f"config: {saved} (saved by the run; command-line keys win; launch settings not inherited: " \
           "run_distribute=True, device_num=8, device_id=3)" in ev.stdout
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    metrics = json.load(open(os.path.join(run, "eval_metrics.json")))  # output_path: the run's folder
    assert metrics["num_images"] == 12
    assert metrics["top1"] == pytest.approx(max(r["val_top1"] for r in rows), abs=1e-9)

    wrong = run_script("eval.py", [f"--checkpoint_file_path={best_ckpt}", f"--data_path={data}",
                                   "--dimension_reduction=8"], cwd=elsewhere, check=False)
    assert wrong.returncode == 2 and "wrong shape" in wrong.stderr and "layer_reduce.weight" in wrong.stderr

    ex = run_script("export.py", [f"--checkpoint_file_path={best_ckpt}"], cwd=elsewhere)
    assert f"config: {saved}" in ex.stdout
    mindir = os.path.join(run, "resnet18_isqrt_cov.mindir")
    from src.checkpoint import load_network
    from src.config import load_config
    from src.models import create_model
    demo = load_config([])  # tiny_flags' config file: the run's mean and std, which the model applies
    net = create_model("resnet18", "isqrt_cov", 3, dimension_reduction=16, mean=demo.mean, std=demo.std)
    load_network(net, best_ckpt)
    net.set_train(False)
    x = ms.Tensor(np.random.default_rng(1).integers(0, 256, size=(1, 3, 32, 32)).astype(np.uint8))
    np.testing.assert_allclose(ms.nn.GraphCell(ms.load(mindir))(x).asnumpy(), net(x).asnumpy(), rtol=1e-4, atol=1e-5)
    assert os.listdir(elsewhere) == []  # nothing written in the working folder
