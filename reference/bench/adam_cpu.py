"""Adam on the CPU: torch's default per-parameter loop (what dgr.adam takes), the multi-tensor (foreach)
path (the same arithmetic) and the fused kernel (rounds otherwise), timed interleaved on one GAN iteration of the fast preset (3 critic steps
and a generator step at B = 64; split's width-128 and permuted's width-256 fully connected GAN).

    python reference/bench/adam_cpu.py
"""
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import dgr  # noqa: E402
from bench_ops import time_interleaved  # noqa: E402

KINDS = {"default loop (dgr.adam)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    torch.manual_seed(0)
    for exp in ("split", "permuted"):
        b = dgr.FAST[exp]
        setups = {}
        for kind, options in KINDS.items():
            s = dgr.Scholar((1, 28, 28), b)
            setups[kind] = (s, torch.optim.Adam(s.critic.parameters(), b.effective_critic_lr, (0.5, 0.9), **options),
                            torch.optim.Adam(s.generator.parameters(), b.gen_lr, (0.5, 0.9), **options))
        x = torch.rand(64, 1, 28, 28) * 2 - 1

        def iteration(kind):
            s, critic_opt, gen_opt = setups[kind]
            for _ in range(b.n_critic):
                dgr.critic_step(s, critic_opt, x, 10.0)
            dgr.generator_step(s, gen_opt, 64)
        times = time_interleaved({kind: (lambda kind=kind: iteration(kind)) for kind in KINDS}, rounds=10, per_round=10)
        med = {kind: statistics.median(v) for kind, v in times.items()}
        print(f"fast {exp}, width {b.width}, {b.n_critic} critic steps + 1 generator step, median of 100 each: "
              + ", ".join(f"{kind} {m:.2f} ms ({med['default loop (dgr.adam)'] / m:.3f}x)" for kind, m in med.items()), flush=True)


if __name__ == "__main__":
    main()
