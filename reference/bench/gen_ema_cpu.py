"""The fast split preset's GAN iteration (3 critic steps + 1 generator step, B = 64) with and without the
generator's weight average (gen_ema), interleaved, on the CPU: python reference/bench/gen_ema_cpu.py"""
import os
import statistics
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import dgr
from bench_ops import time_interleaved
b = dgr.FAST["split"]
torch.manual_seed(0)
s = dgr.Scholar((1, 28, 28), b)
opts = s.optimizers(b)
x = torch.rand(256, 1, 28, 28) * 2 - 1
y = torch.randint(10, (256,))
task = dgr.Task("t", x, y, x, y)
def iteration(average):
    def run():
        for _ in range(b.n_critic):
            dgr.critic_step(s, opts["critic"], dgr.generator_inputs(task, dgr.Replay(), 1.0, b.gen_batch), b.lam)
        dgr.generator_step(s, opts["generator"], b.gen_batch)
        if average:
            s.average_generator(b.gen_ema, 500)
    return run
avg_only = lambda: s.average_generator(b.gen_ema, 500)
t = time_interleaved({"without": iteration(False), "with": iteration(True), "average alone": avg_only}, rounds=10, per_round=30)
for k, v in t.items():
    print(f"{k}: median {statistics.median(v):.3f} ms")
print(f"with/without: {statistics.median(t['with']) / statistics.median(t['without']):.3f}")
