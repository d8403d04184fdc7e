"""What the training step costs beyond forward + backward + update, on CPU (not a test).

At an overhead-bound size (ResNet-50 iSQRT-COV at 16x16, batch 2: the convolutions are cheap, so
per-kernel costs show) it compares, for the same network built by src/factory.py:

  plain_o0 / plain_o2     MindSpore's nn.TrainOneStepCell + the project's optimizer (no check, no
                          skip, no scale), float32 / O2
  mindspore_ls_o2         MindSpore's nn.TrainOneStepWithLossScaleCell, dynamic scale, O2 (recorded
                          as an error where it does not run on CPU)
  step_o0                 the project's TrainStep, float32 (fixed scale 1)
  step_o0_dynamic         TrainStep with a dynamic scale on the float32 network (step overhead alone,
                          without the float16 kernels)
  step_o2_fixed / _dynamic  TrainStep at O2 with a fixed / dynamic loss scale (the GPU default)
  base_*                  the same three TrainStep variants built from the TrainStep of git revision
                          --baseline (before the lean step), when given

(a) kernels: each variant is compiled once more in a subprocess with MindSpore's IR dump limited
to the final kernel graphs (MS_DEV_SAVE_GRAPHS=1, MS_DEV_DUMP_IR_PASSES=graph_build); the kernels
are the graphs' nodes less the virtual ones (Load, Depend, UpdateState, MakeTuple, TupleGetItem,
Return), by type. Exact, whatever the machine's load.
(b) time: all variants in one process, timed round-robin (bench/timing.py), median of --repeats.

    python bench/step_overhead.py                    # -> bench/results/step_overhead.json
    python bench/step_overhead.py --arch resnet18 --repeats 2 --warmup 1 --variants plain_o0,step_o2_dynamic \\
        --out /tmp/s.json
"""
import argparse
import collections
import glob
import importlib.util
import os
import platform
import re
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import mindspore as ms  # noqa: E402
from mindspore import nn, Tensor  # noqa: E402

from src.run_env import cpu_info  # noqa: E402
from timing import SETTLE_S, first_calls, time_round_robin  # noqa: E402

VARIANTS = ("plain_o0", "plain_o2", "mindspore_ls_o2", "step_o0", "step_o0_dynamic", "step_o2_fixed",
            "step_o2_dynamic")
BASELINE_VARIANTS = ("base_step_o0", "base_step_o0_dynamic", "base_step_o2_dynamic")
BASELINE_REV = "210cf65"  # main before the lean step: TrainStep in src/factory.py
VIRTUAL = {"Load", "Depend", "UpdateState", "MakeTuple", "TupleGetItem", "Return"}


def _baseline_train_step(rev):
    """The TrainStep class of src/factory.py at git revision ``rev``."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:src/factory.py"], capture_output=True, text=True,
                            check=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="baseline_factory_"), "baseline_factory.py")
    with open(path, "w") as f:
        f.write(source)  # GRAPH_MODE compiles from source files
    spec = importlib.util.spec_from_file_location("baseline_factory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_factory"] = module  # the graph compiler imports a cell's module by name
    spec.loader.exec_module(module)
    return module.TrainStep


def build_variant(name, args):
    """(step cell, whether it takes the stop tensor)."""
    from src.config import load_config
    from src.factory import NetWithLoss, build_network, build_optimizer
    from src.precision import apply_precision
    from src.train_step import TrainStep
    level = "O2" if "o2" in name else "O0"
    cfg = load_config([f"--config_path={args.config}", "--device_target=CPU", f"--batch_size={args.batch}",
                       f"--arch={args.arch}", "--head=isqrt_cov", f"--num_classes={args.num_classes}",
                       f"--image_size={args.image_size}", "--epoch_size=1", f"--amp_level={level}"])
    ms.set_seed(0)
    net = build_network(cfg)
    optimizer = build_optimizer(cfg, net, np.full(1 + args.warmup + args.repeats + 8, 0.01, np.float32))
    net_with_loss = NetWithLoss(apply_precision(net, level), cfg.label_smoothing)

    def dynamic():
        return nn.DynamicLossScaleUpdateCell(loss_scale_value=float(cfg.loss_scale), scale_factor=2,
                                             scale_window=int(cfg.loss_scale_window))
    if name.startswith("plain"):
        cell, takes_stop = nn.TrainOneStepCell(net_with_loss, optimizer), False
    elif name == "mindspore_ls_o2":
        cell, takes_stop = nn.TrainOneStepWithLossScaleCell(net_with_loss, optimizer, dynamic()), False
    else:
        cls = _baseline_train_step(args.baseline) if name.startswith("base_") else TrainStep
        kind = name.split("step_", 1)[1]
        if kind == "o0":
            cell = cls(net_with_loss, optimizer, 1.0)
        elif kind.endswith("dynamic"):
            cell = cls(net_with_loss, optimizer, float(cfg.loss_scale), dynamic(), float16=level == "O2")
        else:
            cell = cls(net_with_loss, optimizer, float(cfg.loss_scale), float16=True)
        takes_stop = True
    cell.set_train(True)
    return cell, takes_stop


def runner(cell, takes_stop, images, labels):
    stop = Tensor(0.0, ms.float32)

    def run():
        out = cell(images, labels, stop) if takes_stop else cell(images, labels)
        first = out[0] if isinstance(out, tuple) else out
        first.asnumpy()  # waits for the step
    return run


def inputs(args):
    rng = np.random.default_rng(0)
    images = Tensor(rng.standard_normal((args.batch, 3, args.image_size, args.image_size)).astype(np.float32))
    labels = Tensor(rng.integers(0, args.num_classes, args.batch).astype(np.int32))
    return images, labels


def count_kernels(ir_dir):
    """Kernels of every final kernel graph under ``ir_dir`` (graph_build_*.ir), by type."""
    by_type = collections.Counter()
    files = sorted(glob.glob(os.path.join(ir_dir, "**", "graph_build_*.ir"), recursive=True))
    for path in files:
        with open(path) as f:
            for line in f:
                m = re.match(r"^\s+%\d+\([^)]*\) = ([A-Za-z_0-9]+)", line)
                if m:
                    op = m.group(1)
                    op = op[len("PrimFunc_"):] if op.startswith("PrimFunc_") else op
                    if op not in VIRTUAL:
                        by_type[op] += 1
    return {"graphs": len(files), "total": sum(by_type.values()), "by_type": dict(sorted(by_type.items()))}


def _count_child(args):
    """--count_one NAME: compile and run the variant once (the IR dump is set by the parent's env)."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    cell, takes_stop = build_variant(args.count_one, args)
    runner(cell, takes_stop, *inputs(args))()


def kernel_counts(names, args, argv):
    out = {}
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"ir_{name}_") as ir_dir:
            env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1", MS_DEV_SAVE_GRAPHS_PATH=ir_dir,
                       MS_DEV_DUMP_IR_PASSES="graph_build", GLOG_v="3")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--count_one", name] + argv,
                                  cwd=ir_dir, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                out[name] = {"error": _last_error(proc.stderr)}
            else:
                out[name] = count_kernels(ir_dir)
        print(f"  kernels {name}: {out[name].get('total', out[name].get('error'))}", flush=True)
    return out


def _last_error(text):
    """The exception line of a child's traceback, and MindSpore's first explanation line after it."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\w+(Error|Exception): ", line):
            detail = next((ln.strip() for ln in lines[i + 1:] if ln.strip() and not ln.startswith("-")), "")
            return f"{line.strip()} {detail}"[:300]
    return (lines[-1] if lines else "failed")[:300]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--settle", type=float, default=SETTLE_S)
    p.add_argument("--variants", default=",".join(VARIANTS + BASELINE_VARIANTS))
    p.add_argument("--baseline", default=BASELINE_REV, help="git revision whose TrainStep the base_* variants use")
    p.add_argument("--no_count", action="store_true", help="skip the kernel counts")
    p.add_argument("--no_time", action="store_true", help="skip the timing")
    p.add_argument("--config", default=os.path.join(ROOT, "config", "resnet50_imagenet2012_config.yaml"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "step_overhead.json"))
    p.add_argument("--count_one", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.count_one:
        return _count_child(args)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS + BASELINE_VARIANTS]
    if unknown:
        raise SystemExit(f"step_overhead.py: unknown variants {unknown}; choose from {VARIANTS + BASELINE_VARIANTS}")
    child_argv = [f"--arch={args.arch}", f"--batch={args.batch}", f"--image_size={args.image_size}",
                  f"--num_classes={args.num_classes}", f"--baseline={args.baseline}", f"--config={args.config}"]
    result = {"config": {"arch": args.arch, "head": "isqrt_cov", "batch": args.batch, "image_size": args.image_size,
                         "num_classes": args.num_classes, "repeats": args.repeats, "warmup": args.warmup,
                         "baseline": args.baseline, "mindspore": ms.__version__, "python": platform.python_version(),
                         "cpu": cpu_info()}}
    if not args.no_count:
        result["kernels"] = kernel_counts(names, args, child_argv)
    if not args.no_time:
        ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
        images, labels = inputs(args)
        runners, errors = {}, {}
        for name in names:
            try:
                runners[name] = runner(*build_variant(name, args), images, labels)
                runners[name]()  # compiles; a variant that cannot run here fails now
            except (RuntimeError, TypeError, ValueError) as exc:
                errors[name] = next((ln.strip() for ln in str(exc).splitlines()
                                     if ln.strip() and not ln.startswith("-")), type(exc).__name__)[:300]
                runners.pop(name, None)
                print(f"  {name}: {errors[name]}", flush=True)
        first_calls(runners)
        times = time_round_robin(runners, args.warmup, args.repeats, args.settle)
        med = {k: float(np.median(v)) for k, v in times.items()}
        result["time_ms"] = {k: {"median": med[k] * 1e3, "min": min(times[k]) * 1e3,
                                 "times": [t * 1e3 for t in times[k]]} for k in times}
        result["errors"] = errors
        ratios = {}
        for name in med:
            ref = "plain_o2" if "o2" in name else "plain_o0"
            if ref in med and name != ref:
                ratios[f"{name}/{ref}"] = med[name] / med[ref]
                per_round = np.array(times[name]) / np.array(times[ref])
                ratios[f"{name}/{ref}_per_round"] = float(np.median(per_round))
        result["ratios"] = ratios
        goal = "step_o2_dynamic/plain_o2"
        if goal in ratios:
            result["targets_met"] = {"step_o2_dynamic_within_5%_of_plain_o2": ratios[goal] <= 1.05}
    _print(result)
    from src.run_log import write_json
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


def _print(result):
    for name, k in result.get("kernels", {}).items():
        print(f"{name:<24} kernels {k.get('total', '-')}")
    for name, t in result.get("time_ms", {}).items():
        print(f"{name:<24} {t['median']:8.1f} ms (min {t['min']:.1f})")
    for k, v in result.get("ratios", {}).items():
        print(f"{k:<48} {v:.3f}")


if __name__ == "__main__":
    main()
