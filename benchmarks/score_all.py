"""``RankingModel.score_all`` (every user x every catalogue item: what the
recommendations refresh, the prequential and the gate run) against
``forward`` over the same user x item pairs laid out one row per pair (how
score_all worked before it split the MLP's first layer), side by side in one
process, one thread, alternating so that load on the machine hits both alike.

    .venv/bin/python benchmarks/score_all.py [--users 1000] [--items 3000]
        [--block-pairs 16384] [--dim 32] [--hidden 64,32] [--repeat 5]

Users in blocks as ``serving.scorer.top_items`` makes them (``block_pairs``
user x item scores). Prints the median seconds of each and their ratio,
checks that both give the same scores (max absolute difference; exit 1 when
over 1e-4), and writes benchmarks/results/score_all.json. No lake or Spark.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))


def by_pairs(model, users, items):
    """forward() over U*I rows: the reference."""
    U, I = len(users), len(items)
    return model.forward({"user_idx": users.repeat_interleave(I), "item_idx": items.repeat(U)}).view(U, I)


def by_score_all(model, users, items):
    return model.score_all(users, items)


def timed(fn, model, users, items, block: int) -> tuple[float, list]:
    t = time.perf_counter()
    out = [fn(model, users[s:s + block], items) for s in range(0, len(users), block)]
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--block-pairs", type=int, default=16384, help="as recommend.block_pairs")
    ap.add_argument("--dim", type=int, default=32, help="as model.embedding_dim")
    ap.add_argument("--hidden", default="64,32", help="as model.hidden")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds after one warm-up round")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "score_all.json"))
    args = ap.parse_args(argv)
    import torch

    from deltarec.models.ranking import RankingModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = RankingModel(1 << 16, 1 << 16, args.dim, [int(h) for h in args.hidden.split(",")], history_length=0)
    for p in model.parameters():  # trained-looking weights, not the zero-initialised ones
        torch.nn.init.normal_(p, std=0.1)
    model.eval()
    users = torch.randint(0, 1 << 16, (args.users,))
    items = torch.randint(0, 1 << 16, (args.items,))
    block = max(1, args.block_pairs // args.items)
    times: dict[str, list[float]] = {"forward_pairs": [], "score_all": []}
    diff = 0.0
    with torch.no_grad():
        for r in range(args.repeat + 1):  # round 0 warms both up and is not counted
            a_s, a = timed(by_pairs, model, users, items, block)
            b_s, b = timed(by_score_all, model, users, items, block)
            if r:
                times["forward_pairs"].append(round(a_s, 4))
                times["score_all"].append(round(b_s, 4))
            diff = max(diff, max(float((x - y).abs().max()) for x, y in zip(a, b)))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"users": args.users, "items": args.items, "block_users": block, "dim": args.dim,
              "hidden": args.hidden, "repeat": args.repeat, "seconds": times, "median_s": med,
              "speedup": round(med["forward_pairs"] / med["score_all"], 3), "max_abs_diff": diff}
    print(f"{args.users} users x {args.items} items, blocks of {block} users, dim {args.dim}, hidden "
          f"{args.hidden}, one thread, median of {args.repeat}:")
    print(f"  forward over pairs {med['forward_pairs']:.3f} s   score_all {med['score_all']:.3f} s   "
          f"speedup {result['speedup']:.2f}x   max |diff| {diff:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
