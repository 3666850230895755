"""K seeds' GANs as one grouped network: does one step for K seeds at once cost less than K steps?

#11 asks that 5 seeds cost at most 1.5x one seed on one GPU. Processes under CUDA MPS gave 1.85x (4 runs)
and 2.0x (5 runs) on an H200 (README, paper-preset split): one graphed critic step at B = 64 runs about
180 small kernels, which leave the GPU partly idle but do not overlap well across processes. This lever
puts the K seeds inside the kernels instead: each seed's DCGAN (dgr.Generator, dgr.make_critic) is a
slice of one network, its convolutions with groups=K, its linear layers batched matmuls over the K seeds,
its batch norm over K times the features (batch norm's statistics are per feature, so per seed). One Adam
over the grouped weights is the K seeds' Adams (Adam is elementwise), and the loss is the sum of the
seeds' losses, so each slice gets its own seed's gradient. The kernels stay about as many, each K times
larger.

    python reference/bench/seeds_grouped.py --check                  # CPU, float64: K grouped steps equal
                                                                     #   K seeds' dgr.critic_step/generator_step
    python reference/bench/seeds_grouped.py --device cuda --out DIR  # graphed ms per step: 1 seed, K grouped

The timing prints, per K, the graphed critic and generator steps and a GAN iteration (5 critic steps and
a generator step, the paper preset's), and the ratio of K seeds grouped to one seed (#11: <= 1.5 at K = 5).
"""
import argparse
import json
import os
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import dgr  # noqa: E402
from bench_ops import captured, time_ms, with_graphs  # noqa: E402


class GroupedLinear(nn.Module):
    """K independent nn.Linear(i, o): x (B, K, i) -> (B, K, o)."""

    def __init__(self, k: int, i: int, o: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.empty(k, o, i)), nn.Parameter(torch.empty(k, o))

    def forward(self, x):
        return torch.einsum("bki,koi->bko", x, self.weight) + self.bias

    @torch.no_grad()
    def load(self, linears) -> None:
        self.weight.copy_(torch.stack([m.weight for m in linears]))
        self.bias.copy_(torch.stack([m.bias for m in linears]))


def grouped_like(module: nn.Module, k: int) -> nn.Module:
    """A conv, transposed conv or batch norm layer for K seeds at once (groups=K, K times the channels)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return type(module)(k * module.in_channels, k * module.out_channels, module.kernel_size, module.stride,
                            module.padding, groups=k)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return type(module)(k * module.num_features)
    assert not any(module.parameters()), module
    return module   # ReLU, LeakyReLU, Tanh: elementwise


@torch.no_grad()
def load_grouped(grouped: nn.Module, seeds: list) -> None:
    """grouped's weights (and batch norm's statistics) <- the K seeds' layers, stacked along channels
    (matched by position: a slice of a Sequential keeps its layers' numbers, a new one counts from 0)."""
    tensors = lambda m: [*m.parameters(), *m.buffers()]   # noqa: E731
    for t, *parts in zip(tensors(grouped), *map(tensors, seeds)):
        t.copy_(parts[0] if t.dim() == 0 else torch.cat(parts))   # num_batches_tracked: a count


class GroupedCritic(nn.Module):
    """K dgr.make_critic critics: x (B, K*c, h, w) -> scores (B, K)."""

    def __init__(self, critics: list):
        super().__init__()
        k = len(critics)
        self.convs = nn.Sequential(*[grouped_like(m, k) for m in critics[0][:-2]])   # up to Flatten, Linear
        self.head = GroupedLinear(k, critics[0][-1].in_features, 1)
        load_grouped(self.convs, [c[:-2] for c in critics])
        self.head.load([c[-1] for c in critics])
        self.k = k

    def forward(self, x):
        h = self.convs(x)
        return self.head(h.reshape(len(h), self.k, -1)).squeeze(2)


class GroupedGenerator(nn.Module):
    """K dgr.Generator generators: z (B, K, z_dim) -> images (B, K*c, h, w)."""

    def __init__(self, generators: list):
        super().__init__()
        g, k = generators[0], len(generators)
        self.k, self.z_dim, self.start = k, g.z_dim, g.start
        self.fc = GroupedLinear(k, g.fc[0].in_features, g.fc[0].out_features)
        self.fc.load([m.fc[0] for m in generators])
        self.fc_rest = nn.Sequential(*[grouped_like(m, k) for m in g.fc[1:]])
        load_grouped(self.fc_rest, [m.fc[1:] for m in generators])
        self.net = nn.Sequential(*[grouped_like(m, k) for m in g.net])
        load_grouped(self.net, [m.net for m in generators])

    def forward(self, z):
        h = self.fc_rest(self.fc(z).reshape(len(z), -1))
        return self.net(h.view(len(z), -1, *self.start))


def seed_draws(n: int, k: int, z_dim: int, device):
    """The noise of K seeds' steps, drawn in the order that K dgr.critic_step calls one after another draw
    it (each: z for its fakes, then its interpolation weights), stacked along the seeds."""
    z, eps = [], []
    for _ in range(k):
        z.append(torch.randn(n, z_dim, device=device))
        eps.append(torch.rand(n, 1, 1, 1, device=device))
    return torch.stack(z, 1), torch.stack(eps, 1)


def grouped_critic_step(g: GroupedGenerator, d: GroupedCritic, opt, x_real: torch.Tensor, lam: float):
    """dgr.critic_step for K seeds at once; x_real (n, K*c, h, w). Returns the sum of the K losses."""
    n, k = len(x_real), d.k
    z, eps = seed_draws(n, k, g.z_dim, x_real.device)
    with torch.no_grad():
        x_fake = g(z)   # train-mode batch norm, as dgr's Scholar.sample(trained=True)
    per_seed = (n, k, -1, *x_real.shape[2:])
    x_hat = (eps * x_real.reshape(per_seed) + (1 - eps) * x_fake.reshape(per_seed)).reshape(x_real.shape)
    x_hat.requires_grad_(True)
    scores = d(torch.cat([x_real, x_fake]))
    grad, = torch.autograd.grad(d(x_hat).sum(), x_hat, create_graph=True)
    penalty = k * dgr.gradient_penalty(grad.reshape(n * k, -1), lam)   # the sum of K seeds' means over n rows
    loss = (scores[n:].mean(0) - scores[:n].mean(0)).sum() + penalty
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def grouped_generator_step(g: GroupedGenerator, d: GroupedCritic, opt, n: int):
    """dgr.generator_step for K seeds at once. Returns the K losses."""
    z = torch.stack([torch.randn(n, g.z_dim, device=next(g.parameters()).device) for _ in range(g.k)], 1)
    d.requires_grad_(False)
    losses = -d(g(z)).mean(0)
    opt.zero_grad(set_to_none=True)
    losses.sum().backward()
    opt.step()
    d.requires_grad_(True)
    return losses.detach()


def scholars(k: int, shape, device, dtype=torch.float32):
    """K paper-preset scholars (seeds 0..K-1) and their GAN grouped into one."""
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(dgr.Scholar(shape, dgr.PAPER["split"]).to(device, dtype))
    g = GroupedGenerator([s.generator for s in out]).to(device, dtype)
    d = GroupedCritic([s.critic for s in out]).to(device, dtype)
    g.to(memory_format=torch.channels_last)   # the layout dgr's Scholar gives its GAN
    d.to(memory_format=torch.channels_last)
    return out, g, d


def check(k: int = 3, n: int = 8, steps: int = 2) -> float:
    """K seeds' dgr steps one after another against the grouped steps, from the same weights and random
    state, in float64 on the CPU: the largest difference of any critic or generator weight after `steps`
    GAN iterations (each: 2 critic steps, 1 generator step)."""
    torch.set_default_dtype(torch.float64)   # dgr draws its noise in the default dtype
    try:
        return largest_difference(k, n, steps)
    finally:
        torch.set_default_dtype(torch.float32)


def largest_difference(k: int, n: int, steps: int) -> float:
    shape, device = (1, 28, 28), torch.device("cpu")
    seeds, g, d = scholars(k, shape, device, torch.float64)
    b = dgr.PAPER["split"]
    opts = [s.optimizers(b) for s in seeds]
    g_opt, d_opt = dgr.adam(g, b.gen_lr, (0.5, 0.9)), dgr.adam(d, b.effective_critic_lr, (0.5, 0.9))
    torch.manual_seed(1)
    x = torch.rand(n, k, *shape) * 2 - 1
    torch.manual_seed(2)
    rng = torch.get_rng_state()
    for _ in range(steps):
        for _ in range(2):
            alone = [dgr.critic_step(s, o["critic"], x[:, i], b.lam) for i, (s, o) in enumerate(zip(seeds, opts))]
        alone.append(torch.stack([dgr.generator_step(s, o["generator"], n) for s, o in zip(seeds, opts)]))
    torch.set_rng_state(rng)
    for _ in range(steps):
        for _ in range(2):
            together = grouped_critic_step(g, d, d_opt, x.flatten(1, 2), b.lam)
        gen_together = grouped_generator_step(g, d, g_opt, n)
    diffs = [(sum(alone[:k]) - together).abs().item(), (alone[k] - gen_together).abs().max().item()]
    for grouped, part in ((d, "critic"), (g, "generator")):
        ref = type(grouped)([getattr(s, part) for s in seeds])   # the seeds trained alone, grouped
        for a, b_ in zip(grouped.state_dict().values(), ref.state_dict().values()):
            diffs.append((a - b_).abs().max().item())
    return max(diffs)


def bench(device, ks, batch: int, reps: int) -> list:
    """Graphed ms per step at batch `batch` (1x28x28, the paper's DCGAN): dgr's own steps for one seed, and
    the grouped steps for each K."""
    shape, b, rows = (1, 28, 28), dgr.PAPER["split"], []

    def graphed_ms(fn):
        graph = captured(fn, device)
        graph()   # eager warm-up 1 of 3; time_ms warms up twice more and captures
        return time_ms(graph, device, reps)

    (s,), _, _ = scholars(1, shape, device)
    opts = with_graphs(True, lambda: s.optimizers(b))   # capturable Adam, as --graphs on builds it
    x = torch.rand(batch, *shape, device=device) * 2 - 1
    one = {"critic": graphed_ms(lambda: dgr.critic_step(s, opts["critic"], x, b.lam)),
           "generator": graphed_ms(lambda: dgr.generator_step(s, opts["generator"], batch))}
    for k in ks:
        _, g, d = scholars(k, shape, device)
        g_opt, d_opt = with_graphs(True, lambda: (dgr.adam(g, b.gen_lr, (0.5, 0.9)),
                                                  dgr.adam(d, b.effective_critic_lr, (0.5, 0.9))))
        xk = torch.rand(batch, k * shape[0], *shape[1:], device=device) * 2 - 1
        ms = {"critic": graphed_ms(lambda: grouped_critic_step(g, d, d_opt, xk, b.lam)),
              "generator": graphed_ms(lambda: grouped_generator_step(g, d, g_opt, batch))}
        row = {"seeds": k, "batch": batch, "one seed critic ms": one["critic"],
               "one seed generator ms": one["generator"], "grouped critic ms": ms["critic"],
               "grouped generator ms": ms["generator"]}
        iteration = lambda t: b.n_critic * t["critic"] + t["generator"]   # noqa: E731
        row["grouped / one seed, GAN iteration"] = iteration(ms) / iteration(one)
        rows.append(row)
        print(f"K = {k}: critic {ms['critic']:.3f} ms (one seed {one['critic']:.3f}), generator "
              f"{ms['generator']:.3f} ms (one seed {one['generator']:.3f}); a GAN iteration for {k} seeds "
              f"grouped costs {row['grouped / one seed, GAN iteration']:.2f}x one seed's", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="CPU, float64: grouped steps equal dgr's, seed by seed")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seeds", default="1,2,5", help="K values to time, comma-separated")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default="", help="folder for seeds_grouped.json")
    a = p.parse_args()
    if a.check:
        diff = check()
        print(f"grouped steps against dgr's, 3 seeds, float64: largest difference {diff:.2e}")
        sys.exit(0 if diff < 1e-9 else 1)
    dgr.load_extension()
    rows = bench(torch.device(a.device), [int(k) for k in a.seeds.split(",")], a.batch, a.reps)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "seeds_grouped.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
