"""Wall time of the CPU demo (`python train.py` with its defaults) for one or more checkouts.

Used to report what a change to the training loop costs or saves (e.g. reading the loss only at log
intervals instead of every step). Each checkout runs the demo in a fresh output folder, in turns
(round-robin) so that machine load affects them alike; the digits are written once beforehand.

    python bench/demo_time.py --repo OLD=/path/to/old/checkout --repo NEW=. --rounds 2
    # -> bench/results/demo_time.json: per run, wall seconds, per-epoch seconds (metrics.jsonl), top-1
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def git_rev(repo):
    out = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def run_demo(repo, data_path, extra):
    out = tempfile.mkdtemp(prefix="demo_time_")
    cmd = [sys.executable, os.path.join(repo, "train.py"), f"--data_path={data_path}", f"--output_path={out}"] + extra
    start = time.time()
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, env=dict(os.environ, GLOG_v="3"))
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {"wall_s": wall, "epoch_s": [r["epoch_time"] for r in rows],
            "top1": max(r.get("val_top1") or 0 for r in rows)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", action="append", default=[], help="LABEL=PATH of a checkout (repeatable)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--extra", default="", help="extra train.py flags, space-separated (e.g. --epoch_size=2)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "demo_time.json"))
    args = parser.parse_args(argv)
    repos = dict(r.split("=", 1) for r in (args.repo or [f"HEAD={ROOT}"]))
    data = os.path.join(tempfile.mkdtemp(prefix="demo_data_"), "digits")
    sys.path.insert(0, ROOT)
    from src.data.demo import prepare_digits
    prepare_digits(data)
    runs = {label: [] for label in repos}
    for _ in range(args.rounds):
        for label, repo in repos.items():
            runs[label].append(run_demo(os.path.abspath(repo), data, args.extra.split()))
            r = runs[label][-1]
            print(f"{label:8s} {r['wall_s']:7.1f} s  epochs {', '.join(f'{e:.1f}' for e in r['epoch_s'])}  "
                  f"top-1 {100 * r['top1']:.2f}%", flush=True)
    result = {"what": "CPU demo (config/digits_demo_config.yaml defaults), wall time of train.py",
              "python": platform.python_version(), "cpu_count": os.cpu_count(), "extra_flags": args.extra,
              "checkouts": {label: {"path": os.path.abspath(repo), "git": git_rev(repo), "runs": runs[label]}
                            for label, repo in repos.items()}}
    from src.run_log import write_json
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
