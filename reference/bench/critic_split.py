"""The critic step over n rows (dgr.critic_step) against the one-batch control (tests/bench_ops.py), timed
interleaved at B = 64: 12 rounds of k steps of each, for the paper preset's DCGAN critic (1x28x28 and
3x32x32, k = 3) and the fast preset's fully connected critics (split's width 128, permuted's 256, k = 30).

    python reference/bench/critic_split.py
"""
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import dgr  # noqa: E402
from bench_ops import critic_step_one_batch, time_interleaved  # noqa: E402

CASES = [("DCGAN", (1, 28, 28), dgr.PAPER["split"], 3), ("DCGAN", (3, 32, 32), dgr.PAPER["split"], 3),
         ("MLP, width 128 (fast split)", (1, 28, 28), dgr.FAST["split"], 30),
         ("MLP, width 256 (fast permuted)", (1, 28, 28), dgr.FAST["permuted"], 30)]


def main() -> None:
    torch.manual_seed(0)
    steps = {"n rows": dgr.critic_step, "one batch": critic_step_one_batch}
    for critic, shape, b, per_round in CASES:
        s = dgr.Scholar(shape, b)
        opt = dgr.adam(s.critic, 1e-4, (0.5, 0.9))
        x = torch.rand(64, *shape) * 2 - 1
        times = time_interleaved({name: (lambda step=step: step(s, opt, x, 10.0)) for name, step in steps.items()},
                                 rounds=12, per_round=per_round)
        med = {k: statistics.median(v) for k, v in times.items()}
        q = {k: (sorted(v)[len(v) // 4], sorted(v)[3 * len(v) // 4]) for k, v in times.items()}
        print(f"{critic}, {'x'.join(map(str, shape))}: median n rows {med['n rows']:.1f} ms "
              f"(IQR {q['n rows'][0]:.1f}-{q['n rows'][1]:.1f}), one batch {med['one batch']:.1f} ms "
              f"(IQR {q['one batch'][0]:.1f}-{q['one batch'][1]:.1f}), speed-up {med['one batch'] / med['n rows']:.2f}x "
              f"over {12 * per_round} steps each, interleaved", flush=True)


if __name__ == "__main__":
    main()
