"""Benchmark of the iSQRT-COV meta-layer, forward+backward, on CPU (not a test).

One step = loss = <meta_layer(x), dout>, its value and its gradient w.r.t. x (so the forward
output is really computed), for:
  ms_explicit        src.isqrt_cov (CovPool -> Sqrtm -> TriuVec) with the hand-written bprops
  ms_autodiff        the very same forward code with the bprops removed, MindSpore autodiff
  ms_autodiff_naive  the textbook forward (ReduceMean, (3I - ZY)/2, ...) with autodiff, for information
  ms_svd             square root by decomposition in MindSpore, the MPN-COV way: MindSpore's Eigh
                     accepts 2-D input only, so batched SVD (equal to EIG for SPD matrices)
  torch_ns           the same iteration in PyTorch with autograd (bench/peers/torch_isqrt.py)
  torch_eigh         torch.linalg.eigh square root, for information
Methods are timed round-robin (load from other processes hits all alike); the median and the
minimum of --repeats runs after --warmup are reported, and ratios to ms_explicit as ratio of
medians, of minima and median of the per-round ratios ("paired"). In the same run MindSpore's BatchMatMul
rate is measured on a graph of 12 chained (B, d, d) products (the forward's count; one graph
launch spread over 12), and the meta-layer's rate counts what the method performs: forward and
backward products (2x forward) and the covariance with its backward. Both frameworks get the
same thread count.

    python bench/meta_layer.py                       # ResNet-50 size: B=32, C=256, 14x14, N=5
    python bench/meta_layer.py --batch 2 --dim 8 --hw 3 --repeats 1 --warmup 0 --out /tmp/m.json
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

from src.isqrt_cov import ISqrtCov, TRACE_EPS, num_products, triu_indices_flat  # noqa: E402
from src.run_env import cpu_info  # noqa: E402
from ms_execution import MultiThreadExecution, tail_cost  # noqa: E402
from timing import SETTLE_S, first_calls, time_round_robin  # noqa: E402

METHODS = ("ms_explicit", "ms_autodiff", "ms_autodiff_naive", "ms_svd", "torch_ns", "torch_eigh")
NOTES = {
    "ms_explicit": "hand-written bprop",
    "ms_autodiff": "same forward code, MindSpore autodiff",
    "ms_autodiff_naive": "textbook forward, MindSpore autodiff",
    "ms_svd": "ops.svd square root (MindSpore Eigh is 2-D only)",
    "torch_ns": "same iteration, PyTorch autograd",
    "torch_eigh": "torch.linalg.eigh square root",
}
COUNTED = ("ms_explicit", "ms_autodiff", "ms_autodiff_naive", "torch_ns")  # perform the NS products


def autodiff_twin(fn):
    """A copy of a src.isqrt_cov function cell that has the same construct but no bprop."""
    twin = type(type(fn).__name__ + "Autodiff", (nn.Cell,), {"construct": type(fn).construct})()
    for k, v in vars(fn).items():
        if not k.startswith("_") and not hasattr(twin, k):
            setattr(twin, k, v)
    for k, v in fn._primitives.items():  # pylint: disable=protected-access
        setattr(twin, k, v)
    return twin


def explicit_net(dim, iter_num, autodiff=False):
    net = ISqrtCov(dim, dimension_reduction=None, iter_num=iter_num)
    if autodiff:
        for cell in (net.cov, net.sqrtm, net.triu):
            cell.fn = autodiff_twin(cell.fn)
    return net


class NaiveMetaLayer(nn.Cell):
    """The meta-layer as one would first write it, without bprop: autodiff baseline and SVD."""

    def __init__(self, dim, iter_num, sqrt="ns"):
        super().__init__()
        self.iter_num = iter_num
        self.sqrt = sqrt
        self.mm = ops.BatchMatMul()
        self.mm_tb = ops.BatchMatMul(transpose_b=True)
        self.eye = Tensor(np.eye(dim, dtype=np.float32))
        self.idx = Tensor(triu_indices_flat(dim))

    def construct(self, x):
        b, c, h, w = x.shape
        xc = x.reshape(b, c, h * w)
        xc = xc - xc.mean(axis=2, keep_dims=True)
        a = self.mm_tb(xc, xc) / (h * w)
        if self.sqrt == "ns":
            y = self.newton_schulz(a)
        else:
            s, u, v = ops.svd(a)
            y = self.mm_tb(u * ops.sqrt(ops.relu(s)).expand_dims(1), v)
        return ops.gather(y.reshape(b, c * c), self.idx, 1)

    def newton_schulz(self, a):
        norm = (a * self.eye).sum(axis=(1, 2), keepdims=True) + TRACE_EPS
        an = a / norm
        t = 1.5 * self.eye - 0.5 * an
        y = self.mm(an, t)
        z = t
        for k in range(2, self.iter_num + 1):
            t = 1.5 * self.eye - 0.5 * self.mm(z, y)
            if k < self.iter_num:
                y, z = self.mm(y, t), self.mm(t, z)
            else:
                y = self.mm(y, t)
        return y * ops.sqrt(norm)


class _Loss(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, x, dout):
        return (self.net(x) * dout).sum()


class FwdBwd(nn.Cell):
    """(loss, dloss/dx) for loss = <net(x), dout>, compiled as one graph."""

    def __init__(self, net):
        super().__init__()
        self.loss = _Loss(net)
        self.value_and_grad = ms.value_and_grad(self.loss, grad_position=0)

    def construct(self, x, dout):
        return self.value_and_grad(x, dout)


class MatMulChain(nn.Cell):
    """k dependent (B, d, d) BatchMatMuls in one graph: the product rate without launch overhead."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.mm = ops.BatchMatMul()

    def construct(self, a, b):
        for _ in range(self.k):
            a = self.mm(a, b)
        return a


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dim", type=int, default=256, help="channels C (the matrices are C x C)")
    p.add_argument("--hw", type=int, default=14, help="spatial size H = W")
    p.add_argument("--iter_num", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10, help="timed runs per method (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per method after compiling")
    p.add_argument("--settle", type=float, default=SETTLE_S,
                   help="seconds of idle before each timed run, so no method pays for the previous one's threads")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads for both MindSpore kernels and PyTorch (default: all cores)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--out", default=os.path.join(HERE, "results", "meta_layer.json"))
    p.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    return p.parse_args(argv)


def markdown_table(result):
    """The result as a Markdown table (for the README)."""
    c, mm = result["config"], result["matmul"]
    lines = [f"Forward+backward, B={c['batch']}, C={c['dim']}, {c['hw']}x{c['hw']}, iter_num={c['iter_num']}, "
             f"GRAPH_MODE, {c['threads']} threads, MindSpore {c['mindspore']}, PyTorch {c['torch']}; "
             f"median (min) of {c['repeats']} runs.",
             "",
             "| method | median ms | min ms | GFLOP/s | time / explicit | finite grad | |",
             "|---|---:|---:|---:|---:|:---:|---|"]
    ref = result["methods"].get("ms_explicit", {}).get("median_ms")
    for name, e in result["methods"].items():
        rate = f"{e['gflops']:.0f}" if "gflops" in e else "-"
        relt = f"{e['median_ms'] / ref:.2f}" if ref else "-"
        lines.append(f"| {name} | {e['median_ms']:.0f} | {e['min_ms']:.0f} | {rate} | {relt} | "
                     f"{'yes' if e['finite'] else 'no'} | {e['note']} |")
    lines += ["", f"BatchMatMul ({mm['shape'][0]}, {mm['shape'][1]}, {mm['shape'][2]}) x same, "
              f"{mm['chained_products']} chained in one graph: {mm['median_ms']:.2f} ms per product, "
              f"{mm['gflops']:.0f} GFLOP/s. One step counts {result['gflop_per_step']:.1f} GFLOP "
              f"({result['products']['forward']} + {result['products']['backward']} products and the covariance)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if min(args.batch, args.dim, args.hw, args.iter_num, args.repeats, args.threads) < 1 or args.warmup < 0:
        raise SystemExit("meta_layer.py: sizes, --iter_num, --repeats and --threads must be >= 1, --warmup >= 0")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"meta_layer.py: unknown methods {unknown}; choose from {', '.join(METHODS)}")

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    import torch
    from peers import torch_isqrt
    torch.set_num_threads(args.threads)

    b, d, hw, n = args.batch, args.dim, args.hw, args.iter_num
    m = hw * hw
    rng = np.random.default_rng(0)
    # Post-ReLU-like features, as the meta-layer sees them in the network.
    x_np = np.maximum(rng.standard_normal((b, d, hw, hw)), 0).astype(np.float32)
    dout_np = rng.standard_normal((b, d * (d + 1) // 2)).astype(np.float32)
    x, dout = Tensor(x_np), Tensor(dout_np)

    def ms_step(net):
        cell = MultiThreadExecution(FwdBwd(net))
        return lambda: tuple(t.asnumpy() for t in cell(x, dout))

    builders = {
        "ms_explicit": lambda: ms_step(explicit_net(d, n)),
        "ms_autodiff": lambda: ms_step(explicit_net(d, n, autodiff=True)),
        "ms_autodiff_naive": lambda: ms_step(NaiveMetaLayer(d, n, "ns")),
        "ms_svd": lambda: ms_step(NaiveMetaLayer(d, n, "svd")),
        "torch_ns": lambda: torch_isqrt.FwdBwd(x_np, dout_np, n, "ns"),
        "torch_eigh": lambda: torch_isqrt.FwdBwd(x_np, dout_np, n, "eigh"),
    }
    runners = {name: builders[name]() for name in methods}
    chain_k = num_products(5)
    chain = MultiThreadExecution(MatMulChain(chain_k))
    mats = [Tensor(v) for v in rng.standard_normal((2, b, d, d)).astype(np.float32) / np.sqrt(d)]
    runners["matmul"] = lambda: chain(*mats).asnumpy()

    # First call compiles; it also gives the gradient each method computes, compared below.
    first, compile_s = first_calls(runners)
    times = time_round_robin(runners, args.warmup, args.repeats, args.settle)
    med = {name: float(np.median(t)) for name, t in times.items()}
    best = {name: float(np.min(t)) for name, t in times.items()}

    prod = 2.0 * b * d ** 3                       # one batched d x d x d product
    cov = 2.0 * b * d * d * m                     # X Ihat X^T, and again its backward
    fwd_p, bwd_p = num_products(n), 2 * num_products(n)
    flop = (fwd_p + bwd_p) * prod + 2 * cov
    mm_med = med["matmul"] / chain_k
    mm_best = best["matmul"] / chain_k
    mm_gflops = prod / mm_med / 1e9

    result = {
        "config": {"batch": b, "dim": d, "hw": hw, "iter_num": n, "repeats": args.repeats,
                   "warmup": args.warmup, "threads": args.threads, "mode": "GRAPH_MODE",
                   "mindspore": ms.__version__, "torch": torch.__version__,
                   "python": platform.python_version(),
                   "cpu": cpu_info()},
        "products": {"forward": fwd_p, "backward": bwd_p},
        "gflop_per_step": flop / 1e9,
        "matmul": {"shape": [b, d, d], "chained_products": chain_k, "median_ms": mm_med * 1e3,
                   "min_ms": mm_best * 1e3, "gflops": mm_gflops, "gflops_best": prod / mm_best / 1e9},
        "methods": {},
        # Every MindSpore graph here carries ms_execution's tail so it runs on the actor threads as
        # inside a network; this is what the tail alone costs (included in the MindSpore times).
        "multi_thread_tail_ms": tail_cost() * 1e3,
    }
    ref_grad = first["ms_explicit"][1] if "ms_explicit" in first else None
    for name in methods:
        loss, grad = first[name]
        entry = {"median_ms": med[name] * 1e3, "min_ms": best[name] * 1e3,
                 "times_ms": [t * 1e3 for t in times[name]], "first_call_s": compile_s[name],
                 "finite": bool(np.isfinite(grad).all() and np.isfinite(loss).all()),
                 "grad_max_abs": float(np.abs(grad).max()), "note": NOTES[name]}
        if ref_grad is not None and name != "ms_explicit" and entry["finite"]:
            entry["grad_rel_diff_vs_explicit"] = float(np.abs(grad - ref_grad).max() / np.abs(ref_grad).max())
        if name in COUNTED:
            entry["gflops"] = flop / med[name] / 1e9
            entry["fraction_of_matmul_rate"] = entry["gflops"] / mm_gflops
        result["methods"][name] = entry

    ratios, targets = {}, {}
    if "ms_explicit" in med:
        ratios["explicit_fraction_of_matmul_rate"] = result["methods"]["ms_explicit"]["fraction_of_matmul_rate"]
        targets["explicit_fraction_of_matmul_rate>=0.80"] = ratios["explicit_fraction_of_matmul_rate"] >= 0.80
        for other in methods:
            if other != "ms_explicit":
                ratios[f"explicit_over_{other}"] = med["ms_explicit"] / med[other]
                ratios[f"explicit_over_{other}_min"] = best["ms_explicit"] / best[other]
                # Per-round ratios (the two ran seconds apart): robust to slow load changes.
                ratios[f"explicit_over_{other}_paired"] = float(np.median(
                    np.array(times["ms_explicit"]) / np.array(times[other])))
        if "torch_ns" in med:
            targets["explicit_over_torch_ns<=0.65"] = ratios["explicit_over_torch_ns"] <= 0.65
        if "ms_autodiff" in med:
            targets["explicit_over_ms_autodiff<=1.0"] = ratios["explicit_over_ms_autodiff"] <= 1.0
    result["ratios"] = ratios
    result["targets_met"] = targets

    print(f"iSQRT-COV meta-layer forward+backward, B={b} C={d} {hw}x{hw} iter_num={n}, GRAPH_MODE, "
          f"{args.threads} threads, median (min) of {args.repeats}")
    print(f"{'method':<18} {'median ms':>9} {'min ms':>8} {'GFLOP/s':>8} {'x explicit':>10}  finite  note")
    for name, e in result["methods"].items():
        rate = f"{e['gflops']:8.1f}" if "gflops" in e else f"{'-':>8}"
        relt = f"{med[name] / med['ms_explicit']:10.2f}" if "ms_explicit" in med else f"{'-':>10}"
        print(f"{name:<18} {e['median_ms']:9.1f} {e['min_ms']:8.1f} {rate} {relt}  {str(e['finite']):<6}  {e['note']}")
    print(f"BatchMatMul {b}x{d}x{d}x{d}: {mm_med * 1e3:.2f} ms ({mm_best * 1e3:.2f} min), {mm_gflops:.1f} GFLOP/s; "
          f"{flop / 1e9:.2f} GFLOP per step ({fwd_p} + {bwd_p} products + covariance)")
    for k, v in ratios.items():
        if not k.endswith(("_min", "_paired")):
            extra = "".join(f", {kind} {ratios[k + '_' + kind]:.3f}" for kind in ("min", "paired")
                            if k + "_" + kind in ratios)
            print(f"{k}: {v:.3f}{' (' + extra[2:] + ')' if extra else ''}")
    for k, v in targets.items():
        print(f"target {k}: {'met' if v else 'MISSED'}")

    from src.run_log import write_json
    write_json(args.out, result)
    print(f"wrote {args.out}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(result))
        print(f"wrote {args.markdown}")
    return result


if __name__ == "__main__":
    main()
