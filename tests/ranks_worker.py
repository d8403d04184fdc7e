"""Rank agreement worker (run by tests/test_distributed.py under a launcher, two ranks): every
src.ranks.Ranks decision once, then a step all ranks take together that fails on rank 1 only.

    python tests/ranks_worker.py OUT_DIR
Writes OUT_DIR/rank_<r>.json: the decisions and the error this rank ended with.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from src.config import load_config  # noqa: E402
from src.distributed import exit_process, init_distributed  # noqa: E402
from src.errors import DataError, UserError  # noqa: E402
from src.ranks import Ranks  # noqa: E402


def main(out_dir):
    dist = init_distributed(load_config(["--run_distribute=True", "--device_num=2", "--demo_dataset="]))
    ranks = Ranks(dist)
    r = dist.rank
    result = {"sum": list(ranks.sum([1.0, r])), "gather": ranks.gather(10 + r), "broadcast": ranks.broadcast(7 + r),
              "any_false": ranks.any(False), "any_rank1": ranks.any(r == 1),
              "agreed": ranks.agree("a shared step", lambda: 100 + r)}

    def fails_on_rank1():
        if r == 1:
            raise DataError("rank 1 cannot read its shard")
        return "ok"

    try:
        ranks.agree("reading the data", fails_on_rank1)
    except UserError as exc:
        result["error"] = [type(exc).__name__, str(exc)]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank_{r}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)
