"""The benchmark scripts run on a tiny size and write the JSON their README tables are made from.

They are benchmarks, not timed tests: nothing here asserts a speed, only that each script runs
end to end (MindSpore, the PyTorch peer, the data pipelines) and reports consistent numbers.
"""
import json
import math
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from data_pipeline import RATIO, SCALE, random_resized_crop_box  # noqa: E402


def _run(script, args, tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, GLOG_v="3")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script)] + args + ["--out", str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def _torch_conv_fc_macs(arch, head, num_classes, image_size):
    """Multiply-adds of the convolutions and linear layers of the PyTorch twin, counted by forward hooks:
    an implementation independent of src.models.count_flops."""
    import torch
    from peers.torch_resnet import create_torch_model
    model = create_torch_model(arch, head, num_classes).eval()
    total = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            total.append(output.numel() * module.in_channels // module.groups * module.kernel_size[0] *
                         module.kernel_size[1])
        elif isinstance(module, torch.nn.Linear):
            total.append(output.numel() * module.in_features)
    for m in model.modules():
        m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return sum(total)


def test_train_step_tiny(tmp_path):
    t0 = time.perf_counter()
    r = _run("train_step.py", ["--archs", "resnet18:isqrt_cov,resnet18:gap", "--batch", "2", "--image_size", "32",
                               "--num_classes", "4", "--steps", "2", "--warmup", "0", "--matmul_size", "256"], tmp_path)
    wall = time.perf_counter() - t0
    assert r["config"]["batch"] == 2 and r["config"]["steps"] == 2 and r["config"]["mode"] == "GRAPH_MODE"
    assert 0 < r["multi_thread_tail_ms"] < 50
    for fw in ("mindspore", "torch"):  # 2 x 256^3 floating-point operations per product
        assert r["matmul"][fw]["gflops"] * r["matmul"][fw]["median_ms"] * 1e6 == pytest.approx(2 * 256 ** 3)
    for name in ("resnet18_isqrt_cov", "resnet18_gap"):
        e = r["networks"][name]
        arch, head = name.split("_", 1)
        # The PyTorch peer is the same network: the same number of trainable parameters.
        assert e["params"] == e["torch_params"] > 0
        assert e["macs_per_image"]["conv_fc"] == _torch_conv_fc_macs(arch, head, 4, 32)
        for fw in ("mindspore", "torch"):
            times = e[fw]["times_s"]
            assert len(times) == 2 and 0 < min(times) and sum(times) < wall  # timed by the script, within the run
            assert e[fw]["median_s"] == pytest.approx(float(np.median(times)))
            assert e[fw]["images_per_s"] * e[fw]["median_s"] == pytest.approx(2)  # batch 2
    assert r["networks"]["resnet18_isqrt_cov"]["macs_per_image"]["meta"] > 0
    assert r["networks"]["resnet18_gap"]["macs_per_image"]["meta"] == 0
    assert set(r["targets_met"]) == {"resnet18_isqrt_cost_over_gap<=flops_ratio",
                                     "resnet18_isqrt_mindspore_over_torch>=1.25"}


_KERNEL_PROBE = """
import sys
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor
ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")

class ThreeKernels(nn.Cell):
    def construct(self, a, b):
        return ops.exp(a * b) + b

x = Tensor(np.ones((2, 3), np.float32))
print(ThreeKernels()(x, x).asnumpy().sum())
"""


def test_kernel_count_reads_the_compiled_graph(tmp_path):
    """step_overhead.count_kernels on MindSpore's own dump of a graph of three kernels (Mul, Exp, Add)."""
    from step_overhead import count_kernels
    script = tmp_path / "probe.py"
    script.write_text(_KERNEL_PROBE)
    ir = tmp_path / "ir"
    env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1", MS_DEV_SAVE_GRAPHS_PATH=str(ir), MS_DEV_DUMP_IR_PASSES="graph_build",
               GLOG_v="3")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) == pytest.approx(6 * (np.e + 1), rel=1e-6)
    assert count_kernels(str(ir)) == {"graphs": 1, "total": 3, "by_type": {"Add": 1, "Exp": 1, "Mul": 1}}


def test_step_overhead_tiny(tmp_path):
    """The step benchmark at a tiny size: kernels and times of MindSpore's plain step and the project's
    dynamic-scale step, which adds kernels to the plain one but keeps one ApplyMomentum per weight."""
    variants = "plain_o0,step_o0_dynamic"
    r = _run("step_overhead.py", ["--arch", "resnet18", "--num_classes", "4", "--repeats", "1", "--warmup", "0",
                                  "--settle", "0", "--variants", variants], tmp_path)
    k = {name: r["kernels"][name]["total"] for name in variants.split(",")}
    assert k["plain_o0"] < k["step_o0_dynamic"], k
    by_type = {name: r["kernels"][name]["by_type"] for name in variants.split(",")}
    # one update per weight: ResNet-18 (60) + the reduction conv and its BatchNorm (3) + fc (2)
    assert by_type["plain_o0"]["ApplyMomentum"] == by_type["step_o0_dynamic"]["ApplyMomentum"] == 65
    assert set(r["time_ms"]) == set(variants.split(",")) and not r["errors"]
    assert all(len(t["times"]) == 1 and t["median"] > 0 for t in r["time_ms"].values())
    assert set(r["ratios"]) == {f"step_o0_dynamic/plain_o0{s}" for s in ("", "_per_round")}


def test_data_pipeline_tiny(tmp_path):
    r = _run("data_pipeline.py", ["--images", "16", "--batch", "4", "--workers", "1", "--repeats", "1", "--epochs", "1",
                                  "--data_dir", str(tmp_path / "jpegs"), "--scan_files", "300",
                                  "--scan_dir", str(tmp_path / "scan")], tmp_path)
    assert r["config"]["images"] == 16 and r["config"]["workers"] == [1]
    for pipeline in ("unprotected", "project", "per_read_check", "pillow"):
        e = r["pipelines"][pipeline]["1"]
        assert e["images_per_epoch"] == 16 and e["images_per_s"] > 0 and e["steady_images_per_s"] > 0
    assert set(r["over_unprotected"]) == {"project", "per_read_check", "pillow"}
    assert r["check"]["files"] == 16 and r["check"]["fraction_of_one_epoch"]["1"] > 0
    scan = r["scan"]
    assert scan["files"] == 300 and scan["classes"] == 300 and scan["refused"] == 0
    assert min(scan["scan_s"], scan["check_s"], scan["rebuild_per_epoch_before_s"], scan["order_per_epoch_s"]) > 0
    jpegs = [f for _, _, files in os.walk(tmp_path / "jpegs") for f in files]
    assert len(jpegs) == 16 and all(f.endswith(".jpg") for f in jpegs)


def test_random_resized_crop_box_stays_inside_and_in_range():
    """The Pillow peer's crop follows torchvision's sampling: inside the image, area fraction in
    SCALE and aspect ratio in RATIO (up to rounding to whole pixels), or the clamped centre crop."""
    rng = random.Random(0)
    for width, height in ((500, 375), (375, 500), (64, 48), (1000, 100)):
        for _ in range(300):
            x0, y0, x1, y1 = random_resized_crop_box(width, height, rng)
            w, h = x1 - x0, y1 - y0
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            fallback = (w == width or h == height) and (x0, y0) == ((width - w) // 2, (height - h) // 2)
            if not fallback:
                assert SCALE[0] * 0.9 <= w * h / (width * height) <= SCALE[1]
                assert RATIO[0] * 0.9 <= w / h <= RATIO[1] * 1.1
    # A very wide image rarely fits a sampled crop: the fallback is the centre crop at ratio 4/3.
    x0, y0, x1, y1 = random_resized_crop_box(1000, 10, random.Random(1))
    assert (y0, y1) == (0, 10) and math.isclose((x1 - x0) / 10, RATIO[1], rel_tol=0.1)


_EXECUTION_PROBE = """
import sys
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor
sys.path.insert(0, sys.argv[1])
from ms_execution import MultiThreadExecution
ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")

class Small(nn.Cell):
    def construct(self, a, b):
        return ops.bmm(a, b), a - b

x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4) / 10
y = np.ones((2, 4, 4), np.float32)
cell = MultiThreadExecution(Small()) if sys.argv[2] == "wrapped" else Small()
for _ in range(4):
    out = cell(Tensor(x), Tensor(y))
np.save(sys.argv[3], np.stack([o.asnumpy() for o in out]))
"""


@pytest.mark.parametrize("wrapped", [False, True])
def test_small_graph_execution_mode(tmp_path, wrapped):
    """MindSpore 2.8 runs a graph of at most 100 kernels in the Python thread after its first run
    (INFO log "in multi thread or not: 0"), which made the meta-layer benchmark bimodal; the
    benchmarks' MultiThreadExecution keeps such a graph on the actor threads, as inside a network,
    and leaves its outputs alone. If the bare graph stops being switched, MindSpore changed and
    bench/ms_execution.py may go."""
    script = tmp_path / "probe.py"
    script.write_text(_EXECUTION_PROBE)
    out = tmp_path / "out.npy"
    env = dict(os.environ, GLOG_v="1")
    proc = subprocess.run([sys.executable, str(script), os.path.join(ROOT, "bench"),
                           "wrapped" if wrapped else "bare", str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = [line.rsplit(":", 1)[1].strip(" .") for line in proc.stderr.splitlines()
             if "SetActorExecutionStrategy" in line and "in multi thread or not" in line]
    assert len(modes) >= 4, proc.stderr[-3000:]
    if wrapped:
        assert set(modes) == {"1"}, modes
    else:
        assert modes[0] == "1" and set(modes[1:]) == {"0"}, modes
    x = np.arange(2 * 4 * 4, dtype=np.float64).reshape(2, 4, 4) / 10
    expected = np.stack([x @ np.ones((2, 4, 4)), x - 1])
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-6)


def test_heads_tiny(tmp_path):
    t0 = time.perf_counter()
    r = _run("heads.py", ["--batch", "1", "--scale", "0.0625", "--repeats", "1", "--warmup", "0",
                          "--cases", "gap_2048_7,isqrt_cov_256_14,bcnn_512_14,cbp_fft_512_14,cbp_gram_512_14"], tmp_path)
    assert r["config"]["batch"] == 1 and r["config"]["proj_dim"] == 512 and r["config"]["mode"] == "GRAPH_MODE"
    cases = r["cases"]
    assert set(cases) == {"gap_2048_7", "isqrt_cov_256_14", "bcnn_512_14", "cbp_fft_512_14", "cbp_gram_512_14"}
    assert all(e["finite"] and e["median_ms"] > 0 for e in cases.values())
    assert cases["bcnn_512_14"]["output_dim"] == 32 * 32 and cases["gap_2048_7"]["output_dim"] == 128
    assert cases["isqrt_cov_256_14"]["output_dim"] == 16 * 17 // 2
    assert cases["cbp_gram_512_14"]["output_dim"] == cases["cbp_fft_512_14"]["output_dim"] == 512
    # X X^T for bcnn and cbp's gram method alike; fft's sketches are not products.
    assert cases["bcnn_512_14"]["forward_matmul_gmac_per_batch"] == \
        cases["cbp_gram_512_14"]["forward_matmul_gmac_per_batch"] == 32 * 32 * 196 / 1e9
    wall = time.perf_counter() - t0
    assert all(len(e["times_ms"]) == 1 and 0 < e["times_ms"][0] for e in cases.values())
    assert sum(e["times_ms"][0] for e in cases.values()) / 1e3 < wall  # timed inside the run
    assert set(r["cbp_fft_over_gram"]) == {"512_14"}


def test_heads_tiny_dropcov_isice_and_memory(tmp_path):
    """The DropCov (training path) and iSICE cases, with --memory's per-case child processes."""
    r = _run("heads.py", ["--batch", "2", "--scale", "0.0625", "--repeats", "1", "--warmup", "0", "--memory",
                          "--cases", "isqrt_cov_256_14,dropcov_256_14,isice_256_7"], tmp_path)
    cases = r["cases"]
    assert set(cases) == {"isqrt_cov_256_14", "dropcov_256_14", "isice_256_7"}
    for e in cases.values():
        assert e["finite"] and e["median_ms"] > 0 and e["output_dim"] == 16 * 17 // 2
        assert 0 < e["peak_rss_mb"] < 4096
    assert cases["dropcov_256_14"]["forward_matmul_gmac_per_batch"] == 2 * 16 * 16 * 196 / 1e9
    # iSICE: the covariance and 5 inverses (7 Newton-Schulz steps, 18 products, and Z Z each) of 16 x 16.
    assert cases["isice_256_7"]["forward_matmul_gmac_per_batch"] == pytest.approx(
        2 * (16 * 16 * 49 + 5 * 19 * 16 ** 3) / 1e9)
