"""Training-step throughput on CPU: MindSpore (GRAPH_MODE) against the same network in PyTorch (not a test).

Every MindSpore network is built through src/factory.py exactly as train.py builds it (the YAML
config, build_network, build_optimizer with the per-step lr array and weight decay, and
build_train_step: forward, backward, non-finite check, Momentum update). The PyTorch peer
(bench/peers/torch_train_step.py) is the same network with SGD momentum 0.9 and weight decay
1e-4, float32, NCHW, with torch.set_num_threads equal to MindSpore's thread count. All runners
are timed round-robin in one process, so load from other processes hits every one alike; the
median step is reported after warm-up. The same run measures a large float32 matmul (MindSpore
and PyTorch), the machine's reference rate for the achieved fraction (training ~= 3x the forward
multiply-adds, 2 FLOP each).

    python bench/train_step.py                  # ResNet-50 iSQRT-COV and GAP, batch 16, 224x224
    python bench/train_step.py --profile        # also time the parts of each step (see README)
    python bench/train_step.py --archs resnet18:isqrt_cov,resnet18:gap --batch 2 --image_size 64 \\
        --num_classes 10 --steps 1 --warmup 0 --no_torch --out /tmp/t.json
"""
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
from mindspore import nn, ops, Tensor  # noqa: E402
from ms_execution import MultiThreadExecution, tail_cost  # noqa: E402
from src.run_env import cpu_info  # noqa: E402
from timing import SETTLE_S, first_calls, time_round_robin  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "config", "resnet50_imagenet2012_config.yaml")


# ----------------------------------------------------------------------------- MindSpore parts
class GradOf(nn.Cell):
    """Forward + backward of ``net`` for a given output cotangent: gradients of the weights and,
    with ``wrt_input``, of the input too (as inside the full network, where it flows back)."""

    def __init__(self, net, weights, wrt_input=True):
        super().__init__()
        self.net = net
        self.weights = weights
        self.grad = ops.GradOperation(get_all=wrt_input, get_by_list=True, sens_param=True)

    def construct(self, x, sens):
        return self.grad(self.net, self.weights)(x, sens)


class LossGrad(nn.Cell):
    """Loss forward + backward (no update): the step minus the optimizer and TrainStep's checks."""

    def __init__(self, net_with_loss, weights):
        super().__init__()
        self.net = net_with_loss
        self.weights = weights
        self.grad = ops.GradOperation(get_by_list=True)

    def construct(self, images, labels):
        return self.grad(self.net, self.weights)(images, labels)


def fixed_grads(weights):
    """Gradient-shaped Parameters. Held as parameters, not passed as arguments: a tuple argument is
    a compile-time constant (reductions of it get folded away) unless mutable, and a mutable one is
    copied into the graph on every call (~70 ms for 57M floats), which the real step never does."""
    return ms.ParameterTuple(ms.Parameter(Tensor(np.full(p.shape, 1e-6, np.float32)), name=f"bench_grad.{i}",
                                          requires_grad=False) for i, p in enumerate(weights))


class OptimizerOnly(nn.Cell):
    """The optimizer update alone, on fixed gradients."""

    def __init__(self, optimizer, grads):
        super().__init__()
        self.optimizer = optimizer
        self.grads = grads

    def construct(self):
        # The update returns a flag; hand back a tensor that depends on it, so the caller can wait.
        return ops.depend(self.optimizer.global_step, self.optimizer(self.grads))


_isfinite_all = ops.MultitypeFuncGraph("isfinite_all")


@_isfinite_all.register("Tensor")
def _isfinite_all_grad(grad):
    return ops.isfinite(grad).all()


class FiniteCheck(nn.Cell):
    """TrainStep's non-finite check on the gradients alone. ``kind="trainstep"``: src.factory's
    check as it is now (float32 training: no unscaling); ``"isfinite_all"``: the earlier one, which
    unscaled every gradient (x 1/scale) and reduced IsFinite of every element (for comparison)."""

    def __init__(self, grads, kind="trainstep"):
        super().__init__()
        from src import factory
        self.hyper_map = ops.HyperMap()
        self.unscale = factory._unscale
        self.finite = factory._finite
        self.grads = grads
        self.kind = kind

    def construct(self, scale):
        grads = self.grads
        if self.kind == "trainstep":
            return ops.stack(self.hyper_map(self.finite, grads)).all()
        grads = self.hyper_map(ops.partial(self.unscale, scale), grads)
        return ops.stack(self.hyper_map(_isfinite_all, grads)).all()


class Forward(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, *inputs):
        return self.net(*inputs)


def ms_run(cell, *inputs):
    """A callable running a compiled cell once; reading an output waits until the graph has run."""
    def run():
        out = cell(*inputs)
        _first_tensor(out).asnumpy()
        return out
    return run


def _first_tensor(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def build_ms_step(arch, head, args, total_steps):
    """Network, optimizer and TrainStep exactly as train.py builds them (src/factory.py)."""
    from src.config import load_config
    from src.factory import build_network, build_optimizer, build_train_step
    from src.schedules import create_lr_schedule
    cfg = load_config([f"--config_path={args.config}", "--device_target=CPU", f"--batch_size={args.batch}",
                       f"--arch={arch}", f"--head={head}", f"--num_classes={args.num_classes}",
                       f"--image_size={args.image_size}", "--epoch_size=1"])
    net = build_network(cfg)
    lr = create_lr_schedule(cfg, total_steps)
    optimizer = build_optimizer(cfg, net, lr)
    step = build_train_step(cfg, net, optimizer)
    return cfg, net, optimizer, step


def ms_profile_runners(name, net, optimizer, step, images, labels, args):
    """The parts of one MindSpore step, each a compiled graph of its own, executed on the actor
    threads as in the whole network (see ms_execution.py: small graphs would otherwise run in the
    Python thread)."""
    def part(cell, *inputs):
        return ms_run(MultiThreadExecution(cell), *inputs)

    net_with_loss = step.network
    weights = optimizer.parameters
    runners = {
        f"ms:{name}:fwd": part(Forward(net_with_loss), images, labels),
        f"ms:{name}:fwd_bwd": part(LossGrad(net_with_loss, weights), images, labels),
        f"ms:{name}:step_plain": part(nn.TrainOneStepCell(net_with_loss, optimizer), images, labels),
    }
    grads = fixed_grads(weights)
    runners[f"ms:{name}:optimizer"] = part(OptimizerOnly(optimizer, grads))
    one = Tensor(1.0, ms.float32)
    runners[f"ms:{name}:finite_check"] = part(FiniteCheck(grads, "trainstep"), one)
    runners[f"ms:{name}:finite_check_isfinite_all"] = part(FiniteCheck(grads, "isfinite_all"), one)

    features = net.features
    b, s = args.batch, args.image_size
    stride4 = 1 if head_of(name) == "isqrt_cov" else 2
    c3 = features.layer4[0].conv1.in_channels
    h3 = -(-s // 16)
    h4 = h3 if stride4 == 1 else -(-h3 // 2)
    c4 = features.out_channels
    rng = np.random.default_rng(1)
    ones_like = lambda shape: Tensor(np.ones(shape, np.float32))  # noqa: E731
    runners[f"ms:{name}:backbone_fwd_bwd"] = part(
        GradOf(features, features.trainable_params(), wrt_input=False), images, ones_like((b, c4, h4, h4)))
    x3 = Tensor(np.maximum(rng.standard_normal((b, c3, h3, h3)), 0).astype(np.float32))
    runners[f"ms:{name}:layer4_fwd_bwd"] = part(
        GradOf(features.layer4, features.layer4.trainable_params()), x3, ones_like((b, c4, h4, h4)))
    x4 = Tensor(np.maximum(rng.standard_normal((b, c4, h4, h4)), 0).astype(np.float32))
    head_cell = nn.SequentialCell([net.representation, net.classifier])
    runners[f"ms:{name}:head_fwd_bwd"] = part(
        GradOf(head_cell, head_cell.trainable_params()), x4, ones_like((b, args.num_classes)))
    rep_dim = net.representation.output_dim
    xr = Tensor(rng.standard_normal((b, rep_dim)).astype(np.float32))
    runners[f"ms:{name}:classifier_fwd_bwd"] = part(
        GradOf(net.classifier, net.classifier.trainable_params()), xr, ones_like((b, args.num_classes)))
    if head_of(name) == "isqrt_cov":
        from meta_layer import FwdBwd
        from src.isqrt_cov import ISqrtCov
        d = net.representation.dim
        meta = ISqrtCov(d, dimension_reduction=None, iter_num=net.representation.iter_num)
        xm = Tensor(np.maximum(rng.standard_normal((b, d, h4, h4)), 0).astype(np.float32))
        runners[f"ms:{name}:meta_fwd_bwd"] = part(FwdBwd(meta), xm, ones_like((b, rep_dim)))
    return runners


def head_of(name):
    return name.split("_", 1)[1]


# ----------------------------------------------------------------------------- matmul rate
class MatMulCell(nn.Cell):
    def __init__(self):
        super().__init__()
        self.mm = ops.MatMul()

    def construct(self, a, b):
        return self.mm(a, b)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--archs", default="resnet50:isqrt_cov,resnet50:gap",
                   help="comma-separated arch:head networks (arch resnet18..resnet152, head isqrt_cov or gap)")
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=5, help="timed steps per runner (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per runner after compiling")
    p.add_argument("--settle", type=float, default=SETTLE_S, help="idle seconds before each timed call (bench/timing.py)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads of MindSpore's kernels and of PyTorch (default: all cores)")
    p.add_argument("--matmul_size", type=int, default=2048, help="N of the N x N x N reference matmul")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch peer")
    p.add_argument("--profile", action="store_true",
                   help="also time the parts: forward, forward+backward, step without TrainStep's checks, "
                        "optimizer, finite check, backbone, layer4, head, classifier, meta-layer")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config the networks are built from")
    p.add_argument("--out", default=os.path.join(HERE, "results", "train_step.json"))
    return p.parse_args(argv)


def _parse_archs(text):
    from src.models import ARCHS, HEADS
    nets = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        arch, _, head = item.partition(":")
        if arch not in ARCHS or head not in HEADS:
            raise SystemExit(f"train_step.py: --archs entries are arch:head with arch in {sorted(ARCHS)} and "
                             f"head in {sorted(HEADS)}, got '{item}'")
        nets.append((arch, head))
    if not nets:
        raise SystemExit("train_step.py: --archs is empty (e.g. --archs resnet50:isqrt_cov,resnet50:gap)")
    return nets


def main(argv=None):
    args = parse_args(argv)
    if min(args.batch, args.image_size, args.steps, args.threads, args.num_classes, args.matmul_size) < 1 \
            or args.warmup < 0:
        raise SystemExit("train_step.py: sizes, --steps and --threads must be >= 1, --warmup >= 0")
    if args.image_size < 32:
        raise SystemExit("train_step.py: --image_size must be >= 32 (the backbone downsamples by 32)")
    nets = _parse_archs(args.archs)

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    ms.set_seed(0)
    torch = None
    if not args.no_torch:
        import torch
        from peers.torch_train_step import TorchTrainStep
        torch.set_num_threads(args.threads)
    from src.models import count_flops, count_params

    rng = np.random.default_rng(0)
    images = Tensor(rng.standard_normal((args.batch, 3, args.image_size, args.image_size)).astype(np.float32))
    labels = Tensor(rng.integers(0, args.num_classes, args.batch).astype(np.int32))
    calls = 1 + args.warmup + args.steps
    total_steps = calls * (10 if args.profile else 1) + 8      # lr array long enough for every call

    runners, info = {}, {}
    for arch, head in nets:
        name = f"{arch}_{head}"
        cfg, net, optimizer, step = build_ms_step(arch, head, args, total_steps)
        flops = count_flops(net, args.image_size)
        info[name] = {"arch": arch, "head": head, "params": count_params(net), "macs_per_image": flops,
                      "weight_decay": float(cfg.weight_decay), "momentum": float(cfg.momentum)}
        runners[f"ms:{name}:step"] = ms_run(step, images, labels, Tensor(0.0, ms.float32))
        if args.profile:
            runners.update(ms_profile_runners(name, net, optimizer, step, images, labels, args))
        if torch is not None:
            peer = TorchTrainStep(arch, head, args.num_classes, args.batch, args.image_size,
                                  iter_num=cfg.iter_num, dimension_reduction=cfg.dimension_reduction,
                                  lr=float(cfg.lr) * args.batch / cfg.lr_base_batch, momentum=float(cfg.momentum),
                                  weight_decay=float(cfg.weight_decay))
            info[name]["torch_params"] = peer.num_params()
            runners[f"torch:{name}:step"] = peer
            if args.profile:
                runners[f"torch:{name}:fwd"] = peer.forward_only
                runners[f"torch:{name}:fwd_bwd"] = peer.forward_backward

    n = args.matmul_size
    a_np = (rng.standard_normal((2, n, n)) / np.sqrt(n)).astype(np.float32)
    runners["ms:matmul"] = ms_run(MultiThreadExecution(MatMulCell()), Tensor(a_np[0]), Tensor(a_np[1]))
    if torch is not None:
        ta, tb = torch.from_numpy(a_np[0]), torch.from_numpy(a_np[1])
        runners["torch:matmul"] = lambda: torch.mm(ta, tb)

    # First call compiles (MindSpore) / allocates (PyTorch); then warm-up and timing, round-robin.
    _, first_s = first_calls(runners, verbose=True)
    times = time_round_robin(runners, args.warmup, args.steps, args.settle)
    med = {key: float(np.median(t)) for key, t in times.items()}

    flop_mm = 2.0 * n ** 3
    mm = {"shape": [n, n, n], "mindspore": {"median_ms": med["ms:matmul"] * 1e3,
                                            "gflops": flop_mm / med["ms:matmul"] / 1e9}}
    if torch is not None:
        mm["torch"] = {"median_ms": med["torch:matmul"] * 1e3, "gflops": flop_mm / med["torch:matmul"] / 1e9}
    ref = max(v["gflops"] for k, v in mm.items() if k != "shape")
    mm["reference_gflops"] = ref

    result = {
        "config": {"batch": args.batch, "image_size": args.image_size, "num_classes": args.num_classes,
                   "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "mode": "GRAPH_MODE",
                   "config_file": os.path.relpath(args.config, ROOT), "mindspore": ms.__version__,
                   "torch": torch.__version__ if torch is not None else None,
                   "python": platform.python_version(), "cpu": cpu_info()},
        "matmul": mm,
        # The MindSpore part graphs and the matmul carry ms_execution's tail (run on the actor threads
        # as inside a network); this is what the tail alone costs. The whole steps do not carry it.
        "multi_thread_tail_ms": tail_cost() * 1e3,
        "networks": {},
    }
    frameworks = ("ms", "torch") if torch is not None else ("ms",)
    for name, entry in info.items():
        train_gflop = 3 * 2 * entry["macs_per_image"]["total"] / 1e9
        entry["train_gflop_per_image"] = train_gflop
        for fw in frameworks:
            key = f"{fw}:{name}:step"
            ips = args.batch / med[key]
            entry["mindspore" if fw == "ms" else "torch"] = {
                "median_s": med[key], "min_s": min(times[key]), "times_s": times[key], "first_call_s": first_s[key],
                "images_per_s": ips, "achieved_gflops": ips * train_gflop,
                "fraction_of_matmul_rate": ips * train_gflop / ref}
        if torch is not None:
            entry["mindspore_over_torch_images_per_s"] = entry["mindspore"]["images_per_s"] / entry["torch"]["images_per_s"]
            # Load from other processes only slows a step down: the ratio of the fastest steps and
            # the median of the per-round ratios (both runners timed back to back) are steadier.
            entry["mindspore_over_torch_min"] = entry["torch"]["min_s"] / entry["mindspore"]["min_s"]
            entry["mindspore_over_torch_per_round"] = float(np.median(
                np.array(times[f"torch:{name}:step"]) / np.array(times[f"ms:{name}:step"])))
        result["networks"][name] = entry

    ratios, targets = {}, {}
    for arch in sorted({a for a, _ in nets}):
        iso, gap = f"{arch}_isqrt_cov", f"{arch}_gap"
        if iso in info and gap in info:
            ratios[f"{arch}_isqrt_over_gap_flops"] = info[iso]["macs_per_image"]["total"] / info[gap]["macs_per_image"]["total"]
            for fw in frameworks:
                label = "mindspore" if fw == "ms" else "torch"
                ratios[f"{arch}_isqrt_over_gap_time_{label}"] = med[f"{fw}:{iso}:step"] / med[f"{fw}:{gap}:step"]
                ratios[f"{arch}_isqrt_over_gap_time_{label}_min"] = (min(times[f"{fw}:{iso}:step"])
                                                                     / min(times[f"{fw}:{gap}:step"]))
            targets[f"{arch}_isqrt_cost_over_gap<=flops_ratio"] = (
                ratios[f"{arch}_isqrt_over_gap_time_mindspore"] <= ratios[f"{arch}_isqrt_over_gap_flops"])
        if iso in info and torch is not None:
            targets[f"{arch}_isqrt_mindspore_over_torch>=1.25"] = result["networks"][iso]["mindspore_over_torch_images_per_s"] >= 1.25
    result["ratios"] = ratios
    result["targets_met"] = targets
    if args.profile:
        result["profile"] = {key: {"median_ms": med[key] * 1e3, "times_ms": [t * 1e3 for t in times[key]]}
                             for key in runners if key.count(":") == 2 and not key.endswith(":step")}
        result["profile"].update({key: {"median_ms": med[key] * 1e3} for key in runners if key.endswith(":step")})

    _print(result, med, args)
    from src.run_log import write_json
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


def _print(result, med, args):
    c = result["config"]
    print(f"\nTraining step, batch {c['batch']}, {c['image_size']}x{c['image_size']}, {c['num_classes']} classes, "
          f"{c['threads']} threads, median of {c['steps']} steps ({c['cpu']['model']})")
    print(f"{'network':<22} {'framework':<10} {'s/step':>7} {'img/s':>7} {'GFLOP/img':>9} {'GFLOP/s':>8} "
          f"{'x matmul':>8}")
    for name, e in result["networks"].items():
        for fw in ("mindspore", "torch"):
            if fw in e:
                r = e[fw]
                print(f"{name:<22} {fw:<10} {r['median_s']:7.3f} {r['images_per_s']:7.2f} "
                      f"{e['train_gflop_per_image']:9.1f} {r['achieved_gflops']:8.1f} {r['fraction_of_matmul_rate']:8.2f}")
        if "mindspore_over_torch_images_per_s" in e:
            print(f"{'':<22} MindSpore / PyTorch images/s: {e['mindspore_over_torch_images_per_s']:.2f} (medians), "
                  f"{e['mindspore_over_torch_min']:.2f} (fastest steps), "
                  f"{e['mindspore_over_torch_per_round']:.2f} (median per round)")
    mm = result["matmul"]
    rates = ", ".join(f"{k} {v['gflops']:.1f} GFLOP/s" for k, v in mm.items() if isinstance(v, dict))
    print(f"float32 matmul {mm['shape']}: {rates}")
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.3f}")
    for k, v in result["targets_met"].items():
        print(f"target {k}: {'met' if v else 'MISSED'}")
    if "profile" in result:
        print("\nprofile (median ms):")
        for k, v in sorted(result["profile"].items()):
            print(f"  {k:<48} {v['median_ms']:9.1f}")


if __name__ == "__main__":
    main()
