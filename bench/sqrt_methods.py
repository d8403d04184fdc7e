"""Benchmark of the matrix square roots of the isqrt_cov head (src/matrix_functions), on CPU (not a test).

For every ``sqrt_method`` (ns, mtp_lya, mpa_lya, svd_pade), side by side in one run, at the ResNet-50
sizes (B = 32, d = 256; covariances of 14x14 and of 7x7 positions, the latter rank-deficient):
  meta   forward+backward of the whole meta-layer, loss = <TriuVec(root(CovPool(x))), dout> and its
         gradient w.r.t. the feature map x (what the network runs);
  sqrt   forward+backward of the square root alone, A -> root(A) on the covariance (the quantity the
         ICLR 2022 paper times; svd_pade has none: its Cell forms the covariance itself in float64);
the number of d x d x d matrix products of its forward and backward (the registry's count, which
tests/test_sqrt_methods.py checks by counting BatchMatMul calls), and the memory the forward keeps
for the backward (every tensor its function Cells return; MindSpore holds them until the bprop).
In the same run MindSpore's BatchMatMul rate is measured on a chain of 12 (B, d, d) products, and
each method's sqrt time is compared with products x product time ("fraction of the product rate").
Graphs run on the actor threads (ms_execution.MultiThreadExecution), timed round-robin (timing.py).

    python bench/sqrt_methods.py                          # B=32, d=256, 14x14 and 7x7 -> results/sqrt_methods.json
    python bench/sqrt_methods.py --batch 4 --dim 32 --repeats 1 --warmup 0 --out /tmp/s.json
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
from mindspore import nn, Tensor  # noqa: E402

from src.run_env import cpu_info  # noqa: E402
from src.isqrt_cov import CovPool, ISqrtCov  # noqa: E402
from src.matrix_functions import SQRT_METHODS  # noqa: E402
from meta_layer import FwdBwd, MatMulChain  # noqa: E402
from ms_execution import MultiThreadExecution, tail_cost  # noqa: E402
from timing import SETTLE_S, first_calls, time_round_robin  # noqa: E402

CHAIN = 12  # chained products measuring the BatchMatMul rate (as bench/meta_layer.py)
PAPER_CLAIM = "MPA-Lya about 3x faster than Newton-Schulz (ICLR 2022: 3.25 ms vs 10.38 ms, 64x48x48, GPU)"


class _Recorder:
    """Stands in for a function Cell in PYNATIVE_MODE and adds up the bytes of what it returns."""

    def __init__(self, cell, total):
        self.cell, self.total = cell, total

    def __call__(self, *args):
        output = self.cell(*args)
        outs = output if isinstance(output, tuple) else (output,)
        self.total[0] += sum(int(o.nbytes) for o in outs if isinstance(o, Tensor))
        return output


def saved_bytes(cell, *inputs):
    """Bytes of every tensor the function Cells (those with a bprop) under ``cell`` return for one
    forward: what MindSpore keeps for their backward. Runs in PYNATIVE_MODE (forward hooks do not
    fire on Cells with a bprop: the Cells are replaced by recorders for the call)."""
    total = [0]
    patched = [(parent, name) for _, parent in cell.cells_and_names()
               for name, child in parent.name_cells().items() if getattr(child, "has_bprop", False)]
    mode = ms.get_context("mode")
    try:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        for parent, name in patched:
            object.__setattr__(parent, name, _Recorder(parent.name_cells()[name], total))
        cell(*inputs)
    finally:
        for parent, name in patched:
            object.__delattr__(parent, name)
        ms.set_context(mode=mode)
    return total[0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dim", type=int, default=256, help="channels d (the matrices are d x d)")
    p.add_argument("--hw", default="14,7", help="spatial sizes H = W, comma-separated (ResNet-50: 14 at stride 1, 7)")
    p.add_argument("--iter_num", type=int, default=5, help="ns iterations")
    p.add_argument("--methods", default=",".join(SQRT_METHODS), help="comma-separated subset of the registry")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per runner (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per runner after compiling")
    p.add_argument("--settle", type=float, default=SETTLE_S, help="idle seconds before each timed run")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of MindSpore's kernels")
    p.add_argument("--out", default=os.path.join(HERE, "results", "sqrt_methods.json"))
    return p.parse_args(argv)


def _runner(cell, *inputs):
    graph = MultiThreadExecution(FwdBwd(cell))
    return lambda: tuple(t.asnumpy() for t in graph(*inputs))


class _Sqrt(nn.Cell):
    """A square-root Cell on (B, d, d) matrices, for FwdBwd."""

    def __init__(self, method, iter_num):
        super().__init__()
        self.root = SQRT_METHODS[method].build(iter_num)

    def construct(self, a):
        return self.root(a)


def main(argv=None):
    args = parse_args(argv)
    sizes = [int(v) for v in args.hw.split(",") if v.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(SQRT_METHODS))
    if unknown or not methods:
        raise SystemExit(f"sqrt_methods.py: unknown methods {unknown}; choose from {', '.join(SQRT_METHODS)}")
    if min([args.batch, args.dim, args.iter_num, args.repeats, args.threads] + sizes) < 1 or args.warmup < 0:
        raise SystemExit("sqrt_methods.py: sizes, --iter_num, --repeats and --threads must be >= 1, --warmup >= 0")
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    b, d, n = args.batch, args.dim, args.iter_num
    rng = np.random.default_rng(0)

    runners, info = {}, {}
    for hw in sizes:
        # Post-ReLU-like features, as the meta-layer sees them; their covariance for the sqrt runners.
        x = Tensor(np.maximum(rng.standard_normal((b, d, hw, hw)), 0).astype(np.float32))
        dout_vec = Tensor(rng.standard_normal((b, d * (d + 1) // 2)).astype(np.float32))
        dout_mat = Tensor(rng.standard_normal((b, d, d)).astype(np.float32))
        cov = CovPool()(x)
        for m in methods:
            meta = ISqrtCov(d, dimension_reduction=None, iter_num=n, sqrt_method=m)
            runners[f"{m}/meta/{hw}"] = _runner(meta, x, dout_vec)
            fwd, bwd = SQRT_METHODS[m].products(n)
            info[f"{m}/meta/{hw}"] = {"saved_mib": saved_bytes(meta, x) / 2 ** 20}
            if not SQRT_METHODS[m].pools:
                sqrt = _Sqrt(m, n)
                runners[f"{m}/sqrt/{hw}"] = _runner(sqrt, cov, dout_mat)
                info[f"{m}/sqrt/{hw}"] = {"saved_mib": saved_bytes(sqrt, cov) / 2 ** 20,
                                          "products": {"forward": fwd, "backward": bwd}}
    chain = MultiThreadExecution(MatMulChain(CHAIN))
    mats = [Tensor(v) for v in rng.standard_normal((2, b, d, d)).astype(np.float32) / np.sqrt(d)]
    runners["matmul"] = lambda: chain(*mats).asnumpy()

    first, compile_s = first_calls(runners, verbose=True)
    times = time_round_robin(runners, args.warmup, args.repeats, args.settle)
    med = {k: float(np.median(t)) for k, t in times.items()}
    product_ms = med["matmul"] / CHAIN * 1e3

    result = {
        "config": {"batch": b, "dim": d, "hw": sizes, "iter_num": n, "repeats": args.repeats,
                   "warmup": args.warmup, "threads": args.threads, "mode": "GRAPH_MODE",
                   "mindspore": ms.__version__, "python": platform.python_version()},
        "cpu": cpu_info(),
        "matmul": {"shape": [b, d, d], "chained_products": CHAIN, "median_ms_per_product": product_ms,
                   "gflops": 2.0 * b * d ** 3 / (product_ms / 1e3) / 1e9},
        "papers": {m: SQRT_METHODS[m].paper for m in methods},
        "runs": {},
        "multi_thread_tail_ms": tail_cost() * 1e3,
    }
    for key in runners:
        if key == "matmul":
            continue
        m, part, hw = key.split("/")
        out = first[key]
        e = dict(info[key], method=m, part=part, hw=int(hw), median_ms=med[key] * 1e3,
                 min_ms=float(np.min(times[key])) * 1e3, times_ms=[t * 1e3 for t in times[key]],
                 first_call_s=compile_s[key], finite=bool(all(np.isfinite(o).all() for o in out)))
        if "products" in e:
            count = e["products"]["forward"] + e["products"]["backward"]
            e["products_ms"] = count * product_ms
            e["fraction_of_product_rate"] = e["products_ms"] / e["median_ms"]
        result["runs"][key] = e
    ratios = {}
    for hw in sizes:
        for part in ("meta", "sqrt"):
            ns = result["runs"].get(f"ns/{part}/{hw}")
            for m in methods:
                other = result["runs"].get(f"{m}/{part}/{hw}")
                if ns and other and m != "ns":
                    ratios[f"ns_over_{m}/{part}/{hw}"] = ns["median_ms"] / other["median_ms"]
    result["speedup_over_ns"] = ratios  # > 1: the method is faster than ns
    result["paper_claim"] = PAPER_CLAIM

    print(f"Square roots forward+backward, B={b} d={d}, GRAPH_MODE, {args.threads} threads, median of "
          f"{args.repeats}; CPU {result['cpu']['model']} (avx512f: {result['cpu']['avx512f']})")
    print(f"{'run':<20} {'median ms':>10} {'min ms':>8} {'products':>9} {'x rate':>7} {'saved MiB':>9}  finite")
    for key, e in result["runs"].items():
        p = e.get("products")
        prods = f"{p['forward']}+{p['backward']}" if p else "-"
        frac = f"{e['fraction_of_product_rate']:.2f}" if p else "-"
        print(f"{key:<20} {e['median_ms']:>10.1f} {e['min_ms']:>8.1f} {prods:>9} {frac:>7} {e['saved_mib']:>9.2f}  "
              f"{e['finite']}")
    print(f"BatchMatMul {b}x{d}x{d}x{d}: {product_ms:.2f} ms per product, {result['matmul']['gflops']:.0f} GFLOP/s")
    for k, v in ratios.items():
        print(f"time(ns) / time({k.split('_over_')[1]}): {v:.2f}")
    from src.run_log import write_json
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
