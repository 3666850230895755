"""The critic step over n rows (dgr.critic_step) against the one-batch control (tests/bench_ops.py), timed
interleaved: 12 rounds of 3 steps of each, B = 64, the DCGAN critic, on 1x28x28 and 3x32x32.

    python reference/bench/critic_split.py
"""
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import dgr  # noqa: E402
from bench_ops import critic_step_one_batch  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    b, steps = dgr.PAPER["split"], {"n rows": dgr.critic_step, "one batch": critic_step_one_batch}
    for shape in ((1, 28, 28), (3, 32, 32)):
        s = dgr.Scholar(shape, b)
        opt = dgr.adam(s.critic, 1e-4, (0.5, 0.9))
        x = torch.rand(64, *shape) * 2 - 1
        times = {name: [] for name in steps}
        for step in steps.values():   # warm-up
            for _ in range(3):
                step(s, opt, x, 10.0)
        for _ in range(12):
            for name, step in steps.items():
                for _ in range(3):
                    t0 = time.perf_counter()
                    step(s, opt, x, 10.0)
                    times[name].append(1e3 * (time.perf_counter() - t0))
        med = {k: statistics.median(v) for k, v in times.items()}
        q = {k: (sorted(v)[len(v) // 4], sorted(v)[3 * len(v) // 4]) for k, v in times.items()}
        print(f"{'x'.join(map(str, shape))}: median n rows {med['n rows']:.0f} ms (IQR {q['n rows'][0]:.0f}-{q['n rows'][1]:.0f}), "
              f"one batch {med['one batch']:.0f} ms (IQR {q['one batch'][0]:.0f}-{q['one batch'][1]:.0f}), "
              f"speed-up {med['one batch'] / med['n rows']:.2f}x over 36 steps each, interleaved", flush=True)


if __name__ == "__main__":
    main()
