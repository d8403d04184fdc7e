"""Fault suite (issue 6): bad images, killed runs, NaNs and wrong inputs, on real subprocesses."""
import glob
import os
import signal
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from tests.helpers import ENV, HOOKED_TRAIN, ROOT, make_image_folder, run_script, tiny_flags


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("data")))


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in err[-1], err[-1]
    return err[-1]


def test_bad_images_are_replaced_and_reported_once(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), train_per_class=6, val_per_class=2)
    cls = os.path.join(data, "train", "class_0")
    good = os.path.join(cls, "000.jpg")
    raw = open(good, "rb").read()
    sos = raw.find(b"\xff\xda")
    open(os.path.join(cls, "truncated.jpg"), "wb").write(raw[: (sos + len(raw)) // 2])  # cut in the scan data
    # cut between frame header and scan: MindSpore's decoder dies of SIGFPE on this one unguarded
    open(os.path.join(cls, "truncated_header.jpg"), "wb").write(raw[:sos])
    open(os.path.join(cls, "zero.jpg"), "wb").close()
    open(os.path.join(cls, "text.jpg"), "w").write("not an image")
    img = Image.open(good)
    img.convert("L").save(os.path.join(cls, "gray.jpg"))
    img.convert("CMYK").save(os.path.join(cls, "cmyk.jpg"))
    img.convert("RGBA").save(os.path.join(cls, "alpha.png"))
    img.resize((7, 5)).save(os.path.join(cls, "tiny.jpg"))
    out = str(tmp_path / "out")
    proc = run_script("train.py", tiny_flags(data, out, epoch_size=2), cwd=tmp_path)
    log = proc.stdout
    for name in ("zero.jpg", "text.jpg", "truncated_header.jpg", "truncated.jpg"):
        assert sum(f"undecodable image (replaced): {os.path.join(cls, name)}" in line
                   for line in log.splitlines()) == 1, log[-3000:]
    assert "epoch 1: 4 undecodable image(s) replaced" in log and "epoch 2: 4 undecodable image(s) replaced" in log
    assert "val top-1" in log
    assert not [f for f in os.listdir(tmp_path) if f not in ("data", "out")], os.listdir(tmp_path)

    check = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_dataset.py"), data],
                           capture_output=True, text=True, env=ENV)
    assert check.returncode == 1
    listed = {line.split(": ")[0] for line in check.stdout.splitlines() if line.startswith(data)}
    assert {os.path.join(cls, n) for n in ("zero.jpg", "text.jpg", "truncated_header.jpg", "truncated.jpg")} <= listed


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(data, tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, os.path.join(ROOT, HOOKED_TRAIN)] + tiny_flags(data, out, epoch_size=3)
    env = dict(ENV, ISQRT_COV_CHECKPOINT_DELAY="3")
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    latest = os.path.join(out, "ckpt", "latest.ckpt")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for epoch 2's latest.ckpt to be mid-write
        if os.path.exists(latest) and glob.glob(os.path.join(out, "ckpt", ".tmp*latest.ckpt")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    before = ms.load_checkpoint(latest)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    after = ms.load_checkpoint(latest)  # the previous file is whole and loadable
    assert int(after["epoch"].asnumpy()) == int(before["epoch"].asnumpy()) == 0
    stale = glob.glob(os.path.join(out, "ckpt", ".tmp*"))
    assert stale  # the killed writer's temporary file, as large as a checkpoint
    resumed = run_script("train.py", tiny_flags(data, out, epoch_size=3, resume_ckpt=latest), cwd=tmp_path)
    assert "resumed from" in resumed.stdout and "at epoch 2 step 0" in resumed.stdout
    assert "epoch 3/3" in resumed.stdout and "epoch 1/3" not in resumed.stdout
    assert not [p for p in stale if os.path.exists(p)]  # removed when the next run started


def test_nan_stops_the_run_and_keeps_good_checkpoints(data, tmp_path):
    out = str(tmp_path / "out")
    proc = run_script(HOOKED_TRAIN, tiny_flags(data, out, epoch_size=3), cwd=tmp_path, check=False,
                      env={"ISQRT_COV_INJECT_NAN_STEP": "8"})  # epoch 2 (6 steps per epoch), step 3
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = _one_line_error(proc, "non-finite loss", "epoch 2 step 3")
    assert "no checkpoint was written" in line
    latest = ms.load_checkpoint(os.path.join(out, "ckpt", "latest.ckpt"))
    assert int(latest["epoch"].asnumpy()) == 0  # still epoch 1's
    for name, value in latest.items():
        if hasattr(value, "asnumpy"):  # metadata entries (arch, head) are strings
            assert np.isfinite(value.asnumpy()).all(), name
    assert not os.path.exists(os.path.join(out, "ckpt", "epoch_002.ckpt"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trained"))
    run_script("train.py", tiny_flags(data, out, epoch_size=1), cwd=out)
    return out


def _eval(data, out, tmp_path, **kw):
    return run_script("eval.py", tiny_flags(data, out, **kw), cwd=tmp_path, check=False)


def test_wrong_inputs_give_one_line_errors(data, trained, tmp_path):
    cases = [
        ("train.py", dict(data_path=str(tmp_path / "nowhere")), ["not found", "nowhere"]),
        ("train.py", dict(data_path=str(tmp_path)), ["train"]),
        ("eval.py", dict(checkpoint_file_path=str(tmp_path / "none.ckpt")), ["does not exist"]),
        ("eval.py", dict(checkpoint_file_path=os.path.join(trained, "ckpt", "best.ckpt"), arch="resnet34"),
         ["does not fit the network", "missing", "layer1.2"]),
        ("eval.py", dict(checkpoint_file_path=os.path.join(trained, "ckpt", "best.ckpt"), dimension_reduction=8),
         ["wrong shape", "layer_reduce.weight"]),
        ("train.py", dict(arch="resnet19"), ["resnet19", "resnet18"]),
        ("train.py", dict(head="svd"), ["svd", "isqrt_cov"]),
        ("train.py", dict(batch_szie=4), ["batch_szie", "batch_size"]),
        ("train.py", dict(epoch_size="many"), ["epoch_size"]),
        ("train.py", dict(config_path=str(tmp_path / "missing.yaml")), ["missing.yaml"]),
    ]
    failures = []
    for script, kw, needles in cases:
        proc = run_script(script, tiny_flags(data, trained, **kw), cwd=tmp_path, check=False)
        try:
            _one_line_error(proc, *needles)
        except AssertionError as exc:
            failures.append(f"{script} {kw}: {exc}")
    assert not failures, "\n".join(failures)


def test_class_count_mismatch_at_eval(data, trained, tmp_path):
    other = make_image_folder(str(tmp_path / "four"), num_classes=4, train_per_class=1, val_per_class=2)
    proc = _eval(other, trained, tmp_path, num_classes=4,
                 checkpoint_file_path=os.path.join(trained, "ckpt", "best.ckpt"))
    _one_line_error(proc, "class")
    proc = _eval(other, trained, tmp_path, num_classes=3,
                 checkpoint_file_path=os.path.join(trained, "ckpt", "best.ckpt"))
    _one_line_error(proc, "--num_classes=4")


def test_pretrained_with_other_class_count_skips_the_classifier(data, trained, tmp_path):
    four = make_image_folder(str(tmp_path / "four"), num_classes=4, train_per_class=6, val_per_class=1)
    out = str(tmp_path / "ft")
    proc = run_script("train.py", tiny_flags(four, out, num_classes=4, epoch_size=1,
                                             pre_trained=os.path.join(trained, "ckpt", "best.ckpt")), cwd=tmp_path)
    assert "2 left at initialisation: fc.bias, fc.weight (another shape in the checkpoint)" in proc.stdout


def test_an_unavailable_device_gives_one_clear_error(monkeypatch):
    """Whatever this machine has: the device set-up fails as MindSpore does without a GPU (a
    RuntimeError from the first kernel), and set_device turns it into one DeviceError line."""
    from src import distributed
    from src.errors import DeviceError
    chosen = []
    monkeypatch.setattr(distributed.ms, "set_device", lambda *args: chosen.append(args))

    def no_gpu():
        raise RuntimeError("Unsupported device target GPU.\n----- C++ Call Stack -----\nframe 0")
    monkeypatch.setattr(distributed, "_probe", no_gpu)
    with pytest.raises(DeviceError) as err:
        distributed.set_device("GPU", 1)
    assert chosen == [("GPU", 1)]
    assert str(err.value) == ("device_target GPU is not available here (Unsupported device target GPU.). Use "
                              "--device_target=CPU, or install the CUDA 11.6 + cuDNN 8 set-up of docs/gpu.md")
    monkeypatch.setattr(distributed, "_probe", lambda: None)  # a device that answers: no error
    distributed.set_device("GPU", 0)
    assert chosen[-1] == ("GPU", 0)
