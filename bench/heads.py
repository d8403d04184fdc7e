"""Benchmark of the representations (heads) alone, forward+backward, on CPU (not a test).

One step = loss = <head(x), dout>, its value and its gradient w.r.t. the feature map x (the
backbone's output), compiled as one GRAPH_MODE graph run on MindSpore's actor threads
(ms_execution.MultiThreadExecution), timed round-robin (timing.time_round_robin) like
bench/meta_layer.py. Sizes are those each head sees in fast-MPN-COV's networks:
  gap        ResNet-50 at 224: 2048 channels, 7x7
  isqrt_cov  ResNet-50 at 224: 256 channels (after the 1x1 reduction, not timed here), 14x14, N=5
  bcnn, cbp  VGG-16 (fast-MPN-COV pairs them with it): 512 channels, 14x14 (224) and 28x28 (448)
  cbp        also ResNet-50 at 448 without reduction: 2048 channels, 14x14
  dropcov    ResNet-50 at 224: 256 channels (after its reduction), 14x14 (layer4 at stride 1), the
             training path (ECA, adaptive rate, channel dropout, covariance); its evaluation is the
             covariance alone
  isice      ResNet-50 (layer4 at stride 2): 256 channels, 7x7 at 224 and 14x14 at 448 (CUB), T=5
cbp is timed with both methods (fft, gram), which compute the same result; fft at 28x28 (about
4 s a step on 2 cores) only when asked for with --cases. Every head runs in training mode.

--memory adds, per case, the peak resident memory of a fresh process compiling and running that case
(VmHWM - VmRSS before the first call, /proc/self/status; MindSpore 2.8's memory statistics read 0 on
CPU): compilation included, so compare cases with each other, not with a GPU's activation memory.

    python bench/heads.py --memory                          # B=8, writes bench/results/heads.json
    python bench/heads.py --batch 2 --scale 0.125 --repeats 1 --warmup 0 --out /tmp/h.json
"""
import json
import subprocess
import argparse
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from src.bilinear import BCNN, CBP  # noqa: E402
from src.dropcov import DropCov  # noqa: E402
from src.isice import ISICE  # noqa: E402
from src.isqrt_cov import ISqrtCov  # noqa: E402
from src.run_env import cpu_info  # noqa: E402
from src.models.network import GlobalAvgPool  # noqa: E402
from meta_layer import FwdBwd  # noqa: E402
from ms_execution import MultiThreadExecution, tail_cost  # noqa: E402
from timing import SETTLE_S, first_calls, time_round_robin  # noqa: E402

# name -> (builder(channels, proj_dim), channels, spatial side, what it stands for)
CASES = {
    "gap_2048_7": (lambda c, d: GlobalAvgPool(c), 2048, 7, "ResNet-50 GAP at 224"),
    "isqrt_cov_256_14": (lambda c, d: ISqrtCov(c, dimension_reduction=None), 256, 14, "ResNet-50 iSQRT-COV at 224"),
    "bcnn_512_14": (lambda c, d: BCNN(c), 512, 14, "VGG-16 B-CNN at 224"),
    "bcnn_512_28": (lambda c, d: BCNN(c), 512, 28, "VGG-16 B-CNN at 448"),
    "cbp_fft_512_14": (lambda c, d: CBP(c, d, method="fft"), 512, 14, "VGG-16 CBP at 224"),
    "cbp_gram_512_14": (lambda c, d: CBP(c, d, method="gram"), 512, 14, "VGG-16 CBP at 224"),
    "cbp_fft_512_28": (lambda c, d: CBP(c, d, method="fft"), 512, 28, "VGG-16 CBP at 448"),
    "cbp_gram_512_28": (lambda c, d: CBP(c, d, method="gram"), 512, 28, "VGG-16 CBP at 448"),
    "cbp_fft_2048_14": (lambda c, d: CBP(c, d, method="fft"), 2048, 14, "ResNet-50 CBP at 448"),
    "cbp_gram_2048_14": (lambda c, d: CBP(c, d, method="gram"), 2048, 14, "ResNet-50 CBP at 448"),
    "dropcov_256_14": (lambda c, d: DropCov(c, dimension_reduction=0), 256, 14, "ResNet-50 DropCov at 224, training"),
    "isice_256_7": (lambda c, d: ISICE(c, dimension_reduction=0), 256, 7, "ResNet-50 iSICE at 224"),
    "isice_256_14": (lambda c, d: ISICE(c, dimension_reduction=0), 256, 14, "ResNet-50 iSICE at 448"),
}

# cbp_fft_512_28 takes ~4 s a step on 2 cores: run it with --cases when wanted.
DEFAULT_CASES = [c for c in CASES if c != "cbp_fft_512_28"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--proj_dim", type=int, default=8192, help="cbp's sketch dimension")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every channel count and proj_dim by this (smoke runs)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case after compiling")
    p.add_argument("--settle", type=float, default=SETTLE_S, help="idle seconds before each timed run")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of MindSpore's kernels")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated subset of " + ", ".join(CASES))
    p.add_argument("--memory", action="store_true", help="also measure each case's peak memory in a fresh process")
    p.add_argument("--memory_case", default="", help=argparse.SUPPRESS)  # the child process of --memory
    p.add_argument("--out", default=os.path.join(HERE, "results", "heads.json"))
    return p.parse_args(argv)


def _build(name, args, rng):
    """(runner, info) of one case: a zero-argument callable running forward+backward once."""
    build, channels, hw, what = CASES[name]
    c = max(2, int(round(channels * args.scale)))
    proj_dim = max(2, int(round(args.proj_dim * args.scale)))
    head = build(c, proj_dim)
    head.set_train(True)  # DropCov's dropout path; the other heads compute the same either way
    # Post-ReLU-like features, as the heads see them in the network.
    x = Tensor(np.maximum(rng.standard_normal((args.batch, c, hw, hw)), 0).astype(np.float32))
    dout = Tensor(rng.standard_normal((args.batch, head.output_dim)).astype(np.float32))
    cell = MultiThreadExecution(FwdBwd(head))
    macs = head.matmul_flops(hw, hw) if hasattr(head, "matmul_flops") else 0
    info = {"channels": c, "hw": hw, "output_dim": int(head.output_dim), "stands_for": what,
            "forward_matmul_gmac_per_batch": macs * args.batch / 1e9}
    return (lambda: tuple(t.asnumpy() for t in cell(x, dout))), info


def _proc_status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(args):
    """Print {"rss_before_mb", "peak_mb"} for args.memory_case: built, then run twice."""
    run, _ = _build(args.memory_case, args, np.random.default_rng(0))
    before = _proc_status_mb("VmRSS")
    run()
    run()
    print(json.dumps({"rss_before_mb": before, "peak_mb": _proc_status_mb("VmHWM")}))


def measure_memory(name, args):
    """Peak resident memory (MiB) a fresh process adds compiling and running case ``name`` twice."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory_case", name, "--batch", str(args.batch),
           "--scale", str(args.scale), "--proj_dim", str(args.proj_dim), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, GLOG_v="3"))
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return r["peak_mb"] - r["rss_before_mb"]


def main(argv=None):
    args = parse_args(argv)
    if min(args.batch, args.repeats, args.threads) < 1 or args.warmup < 0 or args.scale <= 0:
        raise SystemExit("heads.py: --batch, --repeats, --threads must be >= 1, --warmup >= 0, --scale > 0")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"heads.py: unknown cases {unknown}; choose from {', '.join(CASES)}")
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    if args.memory_case:
        return _memory_child(args)
    rng = np.random.default_rng(0)
    proj_dim = max(2, int(round(args.proj_dim * args.scale)))
    runners, info = {}, {}
    for name in cases:
        runners[name], info[name] = _build(name, args, rng)
    first, compile_s = first_calls(runners)
    times = time_round_robin(runners, args.warmup, args.repeats, args.settle)
    result = {
        "config": {"batch": args.batch, "proj_dim": proj_dim, "scale": args.scale, "repeats": args.repeats,
                   "warmup": args.warmup, "threads": args.threads, "mode": "GRAPH_MODE", "train_mode": True,
                   "mindspore": ms.__version__, "python": platform.python_version(),
                   "cpu": cpu_info()},
        "cases": {},
        "multi_thread_tail_ms": tail_cost() * 1e3,
    }
    print(f"Heads forward+backward (w.r.t. the feature map), B={args.batch}, GRAPH_MODE, {args.threads} threads, "
          f"median (min) of {args.repeats}")
    print(f"{'case':<18} {'C':>5} {'HxW':>6} {'out dim':>8} {'median ms':>10} {'min ms':>8} {'fwd GMAC':>9}  finite"
          + ("  peak MiB" if args.memory else ""))
    for name in cases:
        loss, grad = first[name]
        e = dict(info[name], median_ms=float(np.median(times[name])) * 1e3, min_ms=float(np.min(times[name])) * 1e3,
                 times_ms=[t * 1e3 for t in times[name]], first_call_s=compile_s[name],
                 finite=bool(np.isfinite(grad).all() and np.isfinite(loss).all()))
        if args.memory:
            e["peak_rss_mb"] = measure_memory(name, args)
        result["cases"][name] = e
        print(f"{name:<18} {e['channels']:>5} {e['hw']:>3}x{e['hw']:<2} {e['output_dim']:>8} {e['median_ms']:>10.1f} "
              f"{e['min_ms']:>8.1f} {e['forward_matmul_gmac_per_batch']:>9.2f}  {e['finite']}"
              + (f"  {e['peak_rss_mb']:>8.0f}" if args.memory else ""))
    # The same quantity computed two ways (src/bilinear.py): time of "fft" over time of "gram".
    result["cbp_fft_over_gram"] = {
        name.replace("cbp_fft_", ""): result["cases"][name]["median_ms"] / result["cases"][other]["median_ms"]
        for name in cases if name.startswith("cbp_fft_")
        for other in [name.replace("cbp_fft_", "cbp_gram_")] if other in result["cases"]}
    for size, ratio in result["cbp_fft_over_gram"].items():
        print(f"cbp fft / gram time at {size}: {ratio:.1f}")
    from src.run_log import write_json
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
