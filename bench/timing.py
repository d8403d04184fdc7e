"""Timing shared by the benchmarks: first calls (compilation), then round-robin rounds."""
import time

SETTLE_S = 0.3  # default idle before each timed call (see time_round_robin)


def first_calls(runners, verbose=False):
    """Call each runner once (MindSpore compiles, PyTorch allocates): (its results, seconds each)."""
    results, seconds = {}, {}
    for name, run in runners.items():
        t0 = time.perf_counter()
        results[name] = run()
        seconds[name] = time.perf_counter() - t0
        if verbose:
            print(f"  first call {name}: {seconds[name]:.1f} s", flush=True)
    return results, seconds


def time_round_robin(runners, warmup, repeats, settle=SETTLE_S):
    """Seconds per call of each runner over ``repeats`` rounds after ``warmup`` untimed ones.

    The order rotates every round and each timed call starts after ``settle`` idle seconds, so no
    runner always pays for the one before it: the threads a framework leaves spinning (PyTorch's
    OpenMP, MindSpore's actor pool) made whichever method followed PyTorch run bimodally 15-30%
    slower in the meta-layer benchmark. Load from other processes still hits every runner alike.
    """
    names = list(runners)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(settle)
            t0 = time.perf_counter()
            runners[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times
