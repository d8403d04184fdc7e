"""The launch scripts' arguments (issue 19 item 5): today's order and the model zoo's
(mindspore-ai/models official/cv/ResNet/scripts/run_*_gpu.sh), told apart by the third argument's type.
No GPU run: mpirun, msrun and python are fakes on PATH that record the command they were given."""
import json
import os
import stat
import subprocess

import pytest

from tests.helpers import ROOT

FAKE = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_ARGV_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def env(tmp_path):
    """A dataset root with train/ and val/, a config, a checkpoint, and the fake launchers."""
    for split in ("train", "val"):
        os.makedirs(tmp_path / "data" / split / "a")
    (tmp_path / "c.yaml").write_text("arch: resnet18\n")
    (tmp_path / "latest.ckpt").write_bytes(b"x")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("mpirun", "msrun", "python"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return tmp_path


def _run(env, script, *args, extra_env=None):
    log = env / "argv.jsonl"
    if log.exists():
        log.unlink()
    environ = {k: v for k, v in os.environ.items() if k != "DEVICE_NUM"}
    environ.update(PATH=f"{env / 'bin'}:{os.environ['PATH']}", FAKE_ARGV_LOG=str(log), OUTPUT_PATH=str(env / "out"),
                   **(extra_env or {}))
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", script)] + [str(a) for a in args], cwd=str(env),
                          env=environ, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def _flags(call):
    return {a.split("=", 1)[0]: a.split("=", 1)[1] for a in call if a.startswith("--") and "=" in a}


def _launched(env, script, *args, extra_env=None):
    proc, calls = _run(env, script, *args, extra_env=extra_env)
    assert proc.returncode == 0 and len(calls) == 1, proc.stderr
    return proc.stdout, calls[0]


def _refused(env, script, *args, extra_env=None):
    proc, calls = _run(env, script, *args, extra_env=extra_env)
    assert proc.returncode == 2 and calls == [], proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert f"; usage: bash {script} " in proc.stderr
    return proc.stderr


def test_distribute_today_and_model_zoo_orders(env):
    data, ckpt = env / "data", env / "latest.ckpt"
    _, call = _launched(env, "run_distribute_train_gpu.sh", data, env / "c.yaml", 4)
    assert call[:3] == ["mpirun", "--allow-run-as-root", "-n"] and call[3] == "4"
    flags = _flags(call)
    assert (flags["--device_num"], flags["--data_path"], flags["--run_distribute"]) == ("4", str(data), "True")
    assert "--resume_ckpt" not in flags and call[call.index("python") + 1] == os.path.join(ROOT, "train.py")
    _, call = _launched(env, "run_distribute_train_gpu.sh", data, env / "c.yaml", 2, ckpt)
    assert call[3] == "2" and _flags(call)["--resume_ckpt"] == str(ckpt)
    # the model zoo's: DATASET_PATH is {ImageNet}/train, the third argument a checkpoint, 8 GPUs
    out, call = _launched(env, "run_distribute_train_gpu.sh", data / "train", env / "c.yaml", ckpt)
    assert "is a train/ folder (the model zoo's DATASET_PATH): using its parent" in out
    assert "model zoo argument order: 8 GPUs" in out
    assert call[3] == "8" and _flags(call)["--device_num"] == "8" and _flags(call)["--data_path"] == str(data)
    assert _flags(call)["--resume_ckpt"] == str(ckpt)
    _, call = _launched(env, "run_distribute_train_gpu.sh", data, env / "c.yaml", extra_env={"DEVICE_NUM": "2"})
    assert call[3] == "2" and "--resume_ckpt" not in _flags(call)
    _, call = _launched(env, "run_distribute_train_gpu.sh", data / "train", env / "c.yaml", "True", data / "val", ckpt)
    assert "--eval_interval" not in _flags(call) and _flags(call)["--resume_ckpt"] == str(ckpt)
    _, call = _launched(env, "run_distribute_train_gpu.sh", data, env / "c.yaml", "False", data / "val")
    assert _flags(call)["--eval_interval"] == "1000000"  # the last epoch only


def test_distribute_refusals_say_what_is_expected(env):
    data, c = env / "data", env / "c.yaml"
    s = "run_distribute_train_gpu.sh"
    assert "1 argument(s)" in _refused(env, s, data)
    assert "third argument 'latest' is neither DEVICE_NUM (a positive integer) nor a RESUME_CKPT file" in \
        _refused(env, s, data, c, "latest")
    assert "RESUME_CKPT 'gone.ckpt' is not a file" in _refused(env, s, data, c, 8, "gone.ckpt")
    assert "RUN_EVAL 'True' needs EVAL_DATASET_PATH after it" in _refused(env, s, data, c, "True")
    assert f"is not {data}/val, the folder train.py evaluates" in _refused(env, s, data, c, "True", data / "train")
    assert "neither DEVICE_NUM (a positive integer) nor RUN_EVAL" in _refused(env, s, data, c, "0", data / "val")
    assert "DEVICE_NUM='x' in the environment" in _refused(env, s, data, c, extra_env={"DEVICE_NUM": "x"})
    assert "holds no train/ folder: pass the folder that holds train/ and val/" in _refused(env, s, data / "val", c, 2)
    assert "CONFIG_PATH 'nope.yaml' is not a file" in _refused(env, s, data, "nope.yaml", 2)


def test_standalone_eval_finetune_and_cpu_scripts(env):
    data, c, ckpt = env / "data", env / "c.yaml", env / "latest.ckpt"
    _, call = _launched(env, "run_standalone_train_gpu.sh", data / "train", c, ckpt)
    assert call[:2] == ["python", os.path.join(ROOT, "train.py")]
    assert _flags(call)["--data_path"] == str(data) and _flags(call)["--resume_ckpt"] == str(ckpt)
    assert "no DEVICE_NUM here" in _refused(env, "run_standalone_train_gpu.sh", data, c, 2)
    # the model zoo's eval: DATASET_PATH is the validation folder itself, CONFIG_PATH third
    _, call = _launched(env, "run_eval_gpu.sh", data / "val", ckpt, c)
    assert call[1] == os.path.join(ROOT, "eval.py")
    assert (_flags(call)["--data_path"], _flags(call)["--checkpoint_file_path"], _flags(call)["--config_path"]) == \
        (str(data), str(ckpt), str(c))
    _, call = _launched(env, "run_eval_gpu.sh", data, ckpt)
    assert "--config_path" not in _flags(call)
    assert "CHECKPOINT_PATH 'x.ckpt' is not a file" in _refused(env, "run_eval_gpu.sh", data, "x.ckpt")
    _, call = _launched(env, "run_finetune_gpu.sh", data, c, ckpt)
    assert call[0] == "python" and _flags(call)["--pre_trained"] == str(ckpt)
    _, call = _launched(env, "run_finetune_gpu.sh", data, c, ckpt, 2)
    assert call[:4] == ["mpirun", "--allow-run-as-root", "-n", "2"] and _flags(call)["--device_num"] == "2"
    _, call = _launched(env, "run_distribute_train_cpu.sh", data, c, 2, "--epoch_size=1")
    assert call[0] == "msrun" and _flags(call)["--worker_num"] == "2" and call[-1] == "--epoch_size=1"
    assert "WORKER_NUM 'two' is not a positive integer" in _refused(env, "run_distribute_train_cpu.sh", data, c, "two")
