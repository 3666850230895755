"""dgr.py: Continual Learning with Deep Generative Replay (Shin, Lee, Kim, Kim, NeurIPS 2017) in one file.

A *scholar* is a generator (a WGAN-GP) and a solver (a classifier). On task i the new generator learns
a mix of real task-i inputs (share r) and samples of the previous generator (share 1-r); the new solver
minimises r*CE(S(x), y) + (1-r)*CE(S(x'), S_old(x')), the replayed inputs x' labelled by the old solver.
Replay variants: GR (x' from the previous generator), ER (x' = real past inputs, the upper bound),
Noise (x' = Gaussian noise) and None (plain fine-tuning).

Run an experiment of the paper (results, curves and sample grids land in --out, default results/):
    python dgr.py --exp split                       # Fig. 6/7, class-incremental split MNIST
    python dgr.py --exp permuted --variants gr,none  # Fig. 2
    python dgr.py --exp all --preset quick          # every experiment, tiny budgets (CPU, minutes)
    python dgr.py --exp all --estimate              # the expected time of each, timed here; runs nothing
    python dgr.py --help
Without --preset: the paper's budgets where CUDA is available, else the fast preset (minutes on a CPU).
Reuse the pieces: `from dgr import Scholar, train_task` (importing runs nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPERIMENTS = ("chain", "permuted", "mnist-svhn", "svhn-mnist", "lwf", "split")
VARIANTS = ("gr", "gr+distill", "er", "ewc", "noise", "none")   # the paper's four, plus two baselines
VARIANT_NAMES = {"gr": "GR", "gr+distill": "GR+distill", "er": "ER", "ewc": "EWC", "noise": "Noise", "none": "None"}
LWF_NAMES = {"gr": "LwF-GR", "er": "LwF-ER", "noise": "LwF-Noise", "none": "LwF"}
EWC_EXPERIMENTS = ("permuted", "split")


class UsageError(Exception):
    """Bad input from the user: reported as one line and exit code 2, never as a traceback."""


# ----------------------------------------------------------------------------------------------------
# Command line


@dataclass
class Args:
    exp: str = field(default="permuted", metadata={"help": "experiment: " + ", ".join(EXPERIMENTS) + ", all, or bench (timings)",
                                                   "choices": EXPERIMENTS + ("all", "bench")})
    variants: str = field(default="gr,er,noise,none", metadata={"help": "comma-separated variants among " + ",".join(VARIANTS)
                                                                + " (gr+distill: soft targets at --temperature; ewc: online EWC, permuted and split only)"})
    preset: str = field(default="auto", metadata={"help": "training budgets (README): paper (the literature's; wants a GPU), "
                                                  "fast (for a CPU, chosen from the measured frontier), quick (smoke "
                                                  "test), or auto: paper where CUDA is available, else fast",
                                                  "choices": ("auto", "paper", "fast", "quick")})
    seeds: int = field(default=1, metadata={"help": "number of seeds; runs seeds 0..N-1"})
    r: float | None = field(default=None, metadata={"help": "real-data share r in [0,1] on tasks after the first (default 1/i on task i)"})
    replay_targets: str = field(default="hard", metadata={"help": "label replayed inputs with the old solver's argmax (hard) or probabilities (soft)",
                                                          "choices": ("hard", "soft")})
    temperature: float = field(default=2.0, metadata={"help": "gr+distill: targets softmax(z/T) of the old solver, loss on z/T scaled by T^2"})
    data_dir: str = field(default="", metadata={"help": "dataset root for torchvision MNIST/SVHN (default $DGR_DATA or ./data)"})
    out: str = field(default="results", metadata={"help": "output folder: <out>/<exp>/<variant>_seed<k>.json, figures, summary.md"})
    device: str = field(default="auto", metadata={"help": "torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."})
    impl: str = field(default="auto", metadata={"help": "losses: fused C++/CUDA op (ext), PyTorch reference (torch), or ext if it loads (auto)",
                                                "choices": ("auto", "ext", "torch")})
    tasks: int = field(default=0, metadata={"help": "number of permuted-MNIST tasks (0: preset's, 10 for paper)"})
    solver_iters: int = field(default=0, metadata={"help": "solver steps per task (0: preset's)"})
    gen_iters: int = field(default=0, metadata={"help": "generator steps per task, each after 5 critic steps (0: preset's)"})
    eval_every: int = field(default=0, metadata={"help": "evaluate and print a progress line every k solver steps (0: preset's)"})
    budget: str = field(default="", metadata={"help": "override the preset's budgets: name=value,... of Budget's fields, "
                                                      "e.g. gan=mlp,width=256,gen_lr=2e-4"})
    checkpoint_every: int = field(default=1000, metadata={"help": "also checkpoint every k solver or generator steps inside a task (0: task boundaries only)"})
    resume: bool = field(default=False, metadata={"help": "continue killed runs from their checkpoints in --out; skip finished ones"})
    overwrite: bool = field(default=False, metadata={"help": "replace results and checkpoints already in --out"})
    detect_anomaly: bool = field(default=False, metadata={"help": "torch.autograd anomaly detection (slow; for debugging NaNs)"})
    estimate: bool = field(default=False, metadata={"help": "print the runs to do and their expected time (steps timed here), then exit"})


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(prog="dgr.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        kind = float if f.name == "r" else type(f.default)
        parser.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"), help=f.metadata["help"])
    args = Args(**vars(parser.parse_args(argv)))
    args.data_dir = args.data_dir or os.environ.get("DGR_DATA", "./data")
    check_args(args)
    return args


def check_args(args: Args) -> None:
    bad = [v for v in variant_list(args) if v not in VARIANTS]
    if bad or not variant_list(args):
        raise UsageError(f"unknown variant {', '.join(bad) or '(none given)'}: choose from {','.join(VARIANTS)}")
    if args.r is not None and not 0.0 <= args.r <= 1.0:
        raise UsageError(f"--r must lie in [0, 1], got {args.r}")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    for name in ("tasks", "solver_iters", "gen_iters", "eval_every", "checkpoint_every"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def variant_list(args: Args) -> list[str]:
    return [v.strip().lower() for v in args.variants.split(",") if v.strip()]


# ----------------------------------------------------------------------------------------------------
# Budgets. Sources are in the README: WGAN-GP (Gulrajani et al. 2017) for the critic schedule,
# kuc2477/pytorch-deep-generative-replay for 3000 generator steps per task, van de Ven et al. for the
# 784-400-400-10 solver, batch 128 and 2000 (split) / 5000 (permuted) solver steps per task.


@dataclass
class Budget:
    solver_iters: int = 2000      # solver steps per task
    gen_iters: int = 3000         # generator steps per task (each after n_critic critic steps)
    batch: int = 128              # solver batch (real and replayed batches each this size)
    gen_batch: int = 64           # generator/critic batch
    eval_every: int = 250         # evaluate every k solver steps
    train_limit: int = 0          # use at most this many training images per task (0: all)
    test_limit: int = 0           # evaluate on at most this many test images per task (0: all)
    gan: str = "conv"             # conv: DCGAN convolutions; mlp: fully connected (~10x cheaper on a CPU)
    width: int = 64               # conv: base channels (critic 64-128-256); mlp: hidden units (z-w-2w-out, in-2w-w-1)
    hidden: int = 400             # MLP solver hidden units (784-400-400-10)
    cnn_channels: int = 32        # CNN solver channels (32-64) for 32x32x3 inputs
    n_tasks: int = 10             # permuted MNIST tasks
    warmup_iters: int = 0         # LwF: steps training the new head alone before fine-tuning all
    sample_at: tuple = ()         # generator steps at which sample grids are saved (Fig. 4)
    z_dim: int = 100
    n_critic: int = 5
    lam: float = 10.0             # gradient-penalty weight
    gen_lr: float = 1e-4          # Adam(0.5, 0.9) for the generator
    critic_lr: float = 0.0        # Adam(0.5, 0.9) for the critic (0: gen_lr; another value is the TTUR)
    solver_lr: float = 1e-3       # Adam(0.9, 0.999) for the solver
    solver_schedule: str = "constant"   # solver lr within each task: constant, or cosine (decays to 0)
    ewc_lambda: float = 100.0     # online EWC penalty weight (provisional: a quick-preset sweep, README)
    fisher_samples: int = 500     # training images per task for EWC's diagonal Fisher


PAPER = {
    "chain": Budget(solver_iters=5000, gen_iters=5000, eval_every=1000),
    "permuted": Budget(solver_iters=5000, gen_iters=3000, eval_every=500),
    "split": Budget(solver_iters=2000, gen_iters=3000, eval_every=250),
    "mnist-svhn": Budget(solver_iters=5000, gen_iters=20000, eval_every=500, sample_at=(1000, 2000, 5000, 10000, 20000)),
    "svhn-mnist": Budget(solver_iters=5000, gen_iters=20000, eval_every=500, sample_at=(1000, 2000, 5000, 10000, 20000)),
    "lwf": Budget(solver_iters=5000, gen_iters=20000, eval_every=500, warmup_iters=1000),
}
# fast: for a CPU. split's budget is a point of the frontier of split GR measured on 2 cores (README,
# reference/frontier/): a fully connected WGAN-GP (~10x cheaper per image on a CPU than the DCGAN
# convolutions) with 3 critic steps at twice the generator's lr (TTUR), and the solver at lr 3e-4. The
# other experiments take the same GAN (provisional: their accuracy is not yet measured).
FAST_GAN = dict(gan="mlp", width=128, n_critic=3, gen_lr=2e-4, critic_lr=4e-4)
FAST = {
    "chain": Budget(solver_iters=5000, gen_iters=1500, eval_every=1000, **FAST_GAN),
    "permuted": Budget(solver_iters=5000, gen_iters=800, eval_every=500, **FAST_GAN),
    "split": Budget(solver_iters=1000, gen_iters=800, eval_every=250, solver_lr=3e-4, **FAST_GAN),
    # the CNN solver costs 0.1-0.25 s per step on 2 cores: 1000 steps, not the paper's 5000
    "mnist-svhn": Budget(solver_iters=1000, gen_iters=2000, eval_every=250, sample_at=(200, 500, 1000, 2000), **FAST_GAN),
    "svhn-mnist": Budget(solver_iters=1000, gen_iters=2000, eval_every=250, sample_at=(200, 500, 1000, 2000), **FAST_GAN),
    "lwf": Budget(solver_iters=1000, gen_iters=2000, eval_every=250, warmup_iters=200, **FAST_GAN),
}
# quick: a smoke test that runs every experiment on 2 CPU cores in well under a minute, not a reproduction.
# Its tiny GAN needs lr 1e-3 (measured, width 16: split GR 86 % with lr 1e-3, 22 % with 1e-4 after 100 steps).
QUICK_COMMON = dict(solver_iters=150, gen_iters=60, batch=64, gen_batch=16, eval_every=50, train_limit=3000,
                    test_limit=1000, width=8, hidden=128, cnn_channels=8, n_tasks=3, n_critic=3, gen_lr=1e-3)
QUICK = {exp: Budget(**QUICK_COMMON) for exp in EXPERIMENTS}
QUICK["lwf"] = Budget(**{**QUICK_COMMON, "warmup_iters": 30})
QUICK["split"] = Budget(**{**QUICK_COMMON, "gen_iters": 120, "solver_iters": 200})
for _exp in ("mnist-svhn", "svhn-mnist"):
    QUICK[_exp] = Budget(**{**QUICK_COMMON, "sample_at": (10, 20, 40, 60)})


def budget_for(args: Args, exp: str) -> Budget:
    preset = args.preset if args.preset != "auto" else "paper" if torch.cuda.is_available() else "fast"   # main: by device
    b = copy.deepcopy({"paper": PAPER, "fast": FAST, "quick": QUICK}[preset][exp])
    for name in ("solver_iters", "gen_iters", "eval_every"):
        if getattr(args, name):
            setattr(b, name, getattr(args, name))
    if args.tasks:
        b.n_tasks = args.tasks
    return dataclasses.replace(b, **budget_overrides(args.budget))


def budget_overrides(text: str) -> dict:
    """`name=value,...` -> {name: value} with each value of its Budget field's type; UsageError if bad."""
    fields = {f.name: f for f in dataclasses.fields(Budget)}
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in fields or not value:
            raise UsageError(f"--budget: {item!r} is not name=value with a name among {', '.join(fields)}")
        kind = type(fields[name].default)
        try:
            out[name] = tuple(int(v) for v in value.split(":")) if kind is tuple else kind(value)
        except ValueError:
            raise UsageError(f"--budget: {name} takes a {kind.__name__}, got {value!r}") from None
    if out.get("gan", "conv") not in ("conv", "mlp"):
        raise UsageError(f"--budget: gan is conv or mlp, got {out['gan']!r}")
    if out.get("solver_schedule", "constant") not in ("constant", "cosine"):
        raise UsageError(f"--budget: solver_schedule is constant or cosine, got {out['solver_schedule']!r}")
    return out


# ----------------------------------------------------------------------------------------------------
# Data: torchvision datasets held as tensors on the training device, pixels in [-1, 1].


@dataclass
class Task:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    head: int = 0                 # solver head used for this task (LwF has one per task)


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def open_dataset(cls, root: str, expected: str, folder: str, **kwargs):
    """A torchvision dataset from root; download when missing; one clear UsageError when that fails
    (removing `folder`, the dataset's own folder, if the failed download left it new and empty)."""
    try:
        return cls(root, download=False, **kwargs)
    except RuntimeError:
        pass
    existed = os.path.exists(folder)
    try:
        return cls(root, download=True, **kwargs)
    except Exception as e:  # no network, server down, corrupt download
        if not existed and not any(files for _, _, files in os.walk(folder)):
            import shutil
            shutil.rmtree(folder, ignore_errors=True)
        raise UsageError(f"{cls.__name__} is not in {os.path.abspath(root)} and could not be downloaded "
                         f"({type(e).__name__}). Expected files: {expected}. Set --data-dir or DGR_DATA.") from None


def load_mnist(data_dir: str, device, rgb32: bool = False):
    """MNIST as (x_train, y_train, x_test, y_test); 28x28x1, or 32x32x3 (padded, channel repeated)."""
    from torchvision.datasets import MNIST
    expected = ", ".join(os.path.join(os.path.abspath(data_dir), "MNIST", "raw", f) for f in MNIST_FILES)
    out = []
    for train in (True, False):
        ds = open_dataset(MNIST, data_dir, expected, os.path.join(data_dir, "MNIST"), train=train)
        x = ds.data.to(device).float().div_(127.5).sub_(1.0).unsqueeze(1)
        if rgb32:
            x = F.pad(x, (2, 2, 2, 2), value=-1.0).repeat(1, 3, 1, 1)
        out += [x, ds.targets.to(device)]
    return tuple(out)


def load_svhn(data_dir: str, device):
    """SVHN (cropped digits) as (x_train, y_train, x_test, y_test), 32x32x3, labels 0..9."""
    from torchvision.datasets import SVHN
    root = os.path.join(data_dir, "SVHN")
    expected = ", ".join(os.path.join(os.path.abspath(root), f) for f in SVHN_FILES)
    out = []
    for split in ("train", "test"):
        ds = open_dataset(SVHN, root, expected, root, split=split)
        out += [torch.from_numpy(ds.data).to(device).float().div_(127.5).sub_(1.0),
                torch.from_numpy(ds.labels).long().to(device)]
    return tuple(out)


def limited(x: torch.Tensor, y: torch.Tensor, limit: int, gen: torch.Generator):
    if not limit or limit >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=gen)[:limit].to(x.device)
    return x[idx], y[idx]


def make_task(name, data, b: Budget, seed: int, head: int = 0, transform=None, classes=None) -> Task:
    """A task from (x_train, y_train, x_test, y_test): optional class subset and input transform."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for x, y, limit in ((data[0], data[1], b.train_limit), (data[2], data[3], b.test_limit)):
        if classes is not None:
            keep = torch.isin(y, torch.tensor(classes, device=y.device))
            x, y = x[keep], y[keep]
        x, y = limited(x, y, limit, gen)
        parts += [transform(x) if transform else x, y]
    return Task(name, *parts, head=head)


def pixel_permutation(n_pixels: int, seed: int, task: int) -> torch.Tensor:
    """The fixed pixel order of permuted-MNIST task `task` (task 0 is the identity)."""
    if task == 0:
        return torch.arange(n_pixels)
    return torch.randperm(n_pixels, generator=torch.Generator().manual_seed(10_000 * seed + task))


def permuted_tasks(data, b: Budget, seed: int) -> list[Task]:
    tasks = []
    for t in range(b.n_tasks):
        perm = pixel_permutation(28 * 28, seed, t).to(data[0].device)
        permute = lambda x, p=perm: x.flatten(1)[:, p].view_as(x)
        tasks.append(make_task(f"perm{t + 1}", data, b, seed, transform=permute))
    return tasks


SPLIT_CLASSES = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def split_tasks(data, b: Budget, seed: int) -> list[Task]:
    return [make_task(f"{c[0]}-{c[1]}", data, b, seed, classes=c) for c in SPLIT_CLASSES]


# ----------------------------------------------------------------------------------------------------
# Models: DCGAN-style generator, critic without batch norm, MLP or CNN solver with one head per task.


def down_steps(height: int) -> int:
    return 2 if height == 28 else 3


class Generator(nn.Module):
    """z -> image in [-1, 1]: 128x7x7 -> 64x14x14 -> 1x28x28, or 256x4x4 -> ... -> 3x32x32 (width=64)."""

    def __init__(self, shape, z_dim=100, width=64):
        super().__init__()
        c, h, _ = shape
        n_up = down_steps(h)
        self.z_dim, self.start, ch = z_dim, h // 2 ** n_up, width * 2 ** (n_up - 1)
        self.fc = nn.Sequential(nn.Linear(z_dim, ch * self.start ** 2), nn.BatchNorm1d(ch * self.start ** 2), nn.ReLU())
        layers = []
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1), nn.BatchNorm2d(ch // 2), nn.ReLU()]
            ch //= 2
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(ch, c, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        return self.net(self.fc(z).view(len(z), -1, self.start, self.start))


def make_critic(shape, width=64) -> nn.Sequential:
    """Image -> score: convs width-2w-4w (64-128-256) down to 4x4, no batch norm (it breaks the penalty)."""
    c, h, _ = shape
    return nn.Sequential(
        nn.Conv2d(c, width, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 4 * width, 3 if h == 28 else 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(4 * width * 16, 1))


class MLPGenerator(nn.Module):
    """z -> image in [-1, 1] through fully connected layers z-w-2w-(C*H*W) with batch norm (w=width)."""

    def __init__(self, shape, z_dim=100, width=256):
        super().__init__()
        self.z_dim, self.shape = z_dim, tuple(shape)
        self.net = nn.Sequential(nn.Linear(z_dim, width), nn.BatchNorm1d(width), nn.ReLU(),
                                 nn.Linear(width, 2 * width), nn.BatchNorm1d(2 * width), nn.ReLU(),
                                 nn.Linear(2 * width, math.prod(shape)), nn.Tanh())

    def forward(self, z):
        return self.net(z).view(len(z), *self.shape)


def make_mlp_critic(shape, width=256) -> nn.Sequential:
    """Image -> score through fully connected layers (C*H*W)-2w-w-1, leaky ReLU, no batch norm."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 2 * width), nn.LeakyReLU(0.2),
                         nn.Linear(2 * width, width), nn.LeakyReLU(0.2), nn.Linear(width, 1))


class Solver(nn.Module):
    """Classifier: MLP 784-400-400 for 28x28x1, CNN for 32x32x3, then one 10-way linear head per task."""

    def __init__(self, shape, n_classes=10, n_heads=1, hidden=400, cnn_channels=32):
        super().__init__()
        c, h, w = shape
        if c == 1:
            self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(),
                                       nn.Linear(hidden, hidden), nn.ReLU())
        else:
            k = cnn_channels
            self.trunk = nn.Sequential(
                nn.Conv2d(c, k, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(k, 2 * k, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(2 * k * (h // 4) * (w // 4), hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, n_classes) for _ in range(n_heads))

    def forward(self, x, head: int = 0):
        return self.heads[head](self.trunk(x))


class Scholar(nn.Module):
    """Generator + critic (WGAN-GP) and solver, with their optimizers: all a task needs to replay."""

    def __init__(self, shape, b: Budget, n_heads=1, with_generator=True):
        super().__init__()
        self.shape, self.z_dim = tuple(shape), b.z_dim
        self.solver = Solver(shape, 10, n_heads, b.hidden, b.cnn_channels)
        self.solver_opt = torch.optim.Adam(self.solver.parameters(), lr=b.solver_lr)
        self.generator = (Generator if b.gan == "conv" else MLPGenerator)(shape, b.z_dim, b.width) if with_generator else None
        self.critic = (make_critic if b.gan == "conv" else make_mlp_critic)(shape, b.width) if with_generator else None
        if with_generator:   # channels_last: faster convolutions on CPU (oneDNN) and on GPU tensor cores
            self.generator.to(memory_format=torch.channels_last)
            self.critic.to(memory_format=torch.channels_last)
            self.gen_opt = torch.optim.Adam(self.generator.parameters(), lr=b.gen_lr, betas=(0.5, 0.9))
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=b.critic_lr or b.gen_lr, betas=(0.5, 0.9))

    def frozen_copy(self) -> "Scholar":
        """The previous scholar: a copy with no gradients, used only to sample and to label."""
        old = copy.deepcopy(self)
        old.requires_grad_(False)
        return old

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        z = torch.randn(n, self.z_dim, device=next(self.generator.parameters()).device)
        return self.generator(z)   # train-mode batch norm, as in training

    @torch.no_grad()
    def label(self, x: torch.Tensor, head: int = 0, soft: bool = False, temperature: float = 1.0) -> torch.Tensor:
        was_training = self.solver.training
        self.solver.eval()
        logits = self.solver(x, head)
        self.solver.train(was_training)
        return (logits / temperature).softmax(1) if soft else logits.argmax(1)


# ----------------------------------------------------------------------------------------------------
# The two losses of a DGR step: the plain PyTorch references (*_ref), and the fused C++/CUDA ops of
# csrc/ (torch.ops.dgr.*) that replace them. `--impl` picks: auto (the op if it loads), ext, torch.


def gradient_penalty_ref(grad: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * mean_b (||grad_b|| - 1)^2, the norm over ALL non-batch dimensions (C*H*W), per sample."""
    norms = grad.flatten(1).norm(dim=1)
    return lam * (norms - 1).pow(2).mean()


def gradient_penalty(grad: torch.Tensor, lam: float, impl: str | None = None) -> torch.Tensor:
    """WGAN-GP penalty on the critic's input gradient; fused op: one read of grad forward, one backward."""
    if use_extension(grad, impl):
        return torch.ops.dgr.gradient_penalty(grad, lam)
    return gradient_penalty_ref(grad, lam)


def replay_loss_ref(logits_real, labels, logits_replay, targets_replay, r: float) -> torch.Tensor:
    """r * CE(logits_real, labels) + (1 - r) * CE(logits_replay, targets); targets are class indices
    (hard) or probabilities (soft); an empty batch contributes nothing."""
    loss = logits_real.new_zeros(())
    if len(logits_real):
        loss = loss + r * F.cross_entropy(logits_real, labels)
    if len(logits_replay):
        if targets_replay.dtype.is_floating_point:
            ce = -(targets_replay * logits_replay.log_softmax(1)).sum(1).mean()
        else:
            ce = F.cross_entropy(logits_replay, targets_replay)
        loss = loss + (1 - r) * ce
    return loss


def replay_loss(logits_real, labels, logits_replay, targets_replay, r: float, impl: str | None = None) -> torch.Tensor:
    """The solver's replay-mixing loss; fused op: log-softmax, loss and gradient in one pass per row."""
    if use_extension(logits_real, impl):
        return torch.ops.dgr.replay_loss_fwd(logits_real, labels, logits_replay, targets_replay, r)[0]
    return replay_loss_ref(logits_real, labels, logits_replay, targets_replay, r)


EXTENSION_NAME = "dgr_ops"
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
IMPLS = ("auto", "ext", "torch")
_ops = {"impl": "auto", "loaded": None, "kernels": {}}   # loaded: None (not tried yet), True, False


def set_impl(impl: str) -> None:
    """Choose the loss implementation for this process: auto, ext (the fused op, or an error) or torch."""
    if impl not in IMPLS:
        raise UsageError(f"unknown --impl {impl!r}: choose from {', '.join(IMPLS)}")
    _ops["impl"] = impl


def extension_sources(with_cuda: bool) -> list[str]:
    return [os.path.join(CSRC, "dgr_ops.cpp")] + ([os.path.join(CSRC, "cuda", "dgr_ops.cu")] if with_cuda else [])


def prefer_cuda_toolkit() -> None:
    """torch guesses CUDA_HOME from nvcc on PATH, which can point at /usr/local; prefer /usr/local/cuda."""
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def use_extension(x: torch.Tensor, impl: str | None = None) -> bool:
    """Whether the fused op serves this call: impl allows it, the op is loaded and has a kernel for x's device."""
    impl = impl or _ops["impl"]
    if impl == "torch":
        return False
    if _ops["loaded"] is None:
        _ops["loaded"] = load_extension(required=impl == "ext")
    key = "CUDA" if x.is_cuda else "CPU"
    if _ops["loaded"] and _ops["kernels"][key]:
        return True
    if impl == "ext":
        raise UsageError(f"--impl ext: the dgr ops have no {key} kernel here (rebuild: python setup.py build_ext --inplace)")
    return False


def load_extension(required: bool = False) -> bool:
    """Load the ops: the built module dgr_ops if importable, else a JIT build of csrc/ (cached by torch);
    on failure warn once and return False (the PyTorch references serve), or raise if required."""
    import importlib
    import warnings
    try:
        try:
            importlib.import_module(EXTENSION_NAME)
        except ImportError:
            prefer_cuda_toolkit()
            from torch.utils import cpp_extension
            with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
            cpp_extension.load(EXTENSION_NAME, extension_sources(with_cuda), extra_cflags=["-O3"],
                               extra_cuda_cflags=["-O3"], is_python_module=False)
        register_op_python_parts()
        _ops["kernels"] = {key: torch._C._dispatch_has_kernel_for_dispatch_key("dgr::gradient_penalty", key)
                           for key in ("CPU", "CUDA")}
        return True
    except Exception as e:  # compiler missing, build error, ABI mismatch
        lines = str(e).strip().splitlines() or [""]
        first_error = next((ln for ln in lines if " error:" in ln), None) or next((ln for ln in lines if "rror" in ln), lines[-1])
        reason = f"{type(e).__name__}: {first_error.strip()[:300]}"
        if required:
            raise UsageError(f"--impl ext: the dgr extension could not be loaded or built ({reason})") from None
        warnings.warn(f"dgr: fused ops unavailable ({reason}); using the PyTorch reference implementations",
                      RuntimeWarning, stacklevel=3)
        return False


def register_op_python_parts() -> None:
    """Autograd formulas and fake (meta) kernels of the ops, so they train and trace under torch.compile."""
    if getattr(register_op_python_parts, "done", False):
        return
    lib = torch.library

    @lib.register_fake("dgr::gradient_penalty")
    def _(grad, lam):
        return grad.new_empty(())

    @lib.register_fake("dgr::gradient_penalty_backward")
    def _(grad_out, grad, lam):
        return grad.new_empty(grad.shape)

    @lib.register_fake("dgr::replay_loss_fwd")
    def _(logits_real, labels, logits_replay, targets_replay, r):
        return logits_real.new_empty(()), logits_real.new_empty(logits_real.shape), logits_replay.new_empty(logits_replay.shape)

    def gp_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.lam = inputs[1]

    def gp_backward(ctx, grad_out):
        grad, = ctx.saved_tensors
        return torch.ops.dgr.gradient_penalty_backward(grad_out, grad, ctx.lam), None

    def rl_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1], output[2])     # d loss / d logits, made in the forward pass
        ctx.mark_non_differentiable(output[1], output[2])

    def rl_backward(ctx, grad_loss, _grad_d_real, _grad_d_replay):
        d_real, d_replay = ctx.saved_tensors
        return grad_loss * d_real, None, grad_loss * d_replay, None, None

    lib.register_autograd("dgr::gradient_penalty", gp_backward, setup_context=gp_setup)
    lib.register_autograd("dgr::replay_loss_fwd", rl_backward, setup_context=rl_setup)
    register_op_python_parts.done = True


# ----------------------------------------------------------------------------------------------------
# Replay: where the x' of a variant come from, and the training steps.


@dataclass
class Replay:
    """Replayed inputs for one task: 'gr' samples the old generator, 'er' draws stored real inputs of
    past tasks, 'noise' draws Gaussian noise, 'current' reuses the current batch (LwF); 'none' nothing.
    The old solver labels them (its head `head`). 'ewc' replays nothing but penalises moving the weights
    that past tasks' Fisher information marks as important."""
    kind: str = "none"
    old: Scholar | None = None
    pool: list = field(default_factory=list)    # ER: x_train of each past task
    head: int = 0
    soft: bool = False
    temperature: float = 1.0                    # gr+distill: distil at temperature T
    ewc: dict | None = None                     # 'ewc': no inputs; Fisher, anchor and lambda of past tasks

    def inputs(self, n: int, shape, current: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.kind == "gr":
            return self.old.sample(n)
        if self.kind == "er":
            which = torch.randint(len(self.pool), (n,))
            return torch.cat([p[torch.randint(len(p), (int((which == k).sum()),), device=p.device)]
                              for k, p in enumerate(self.pool)])
        if self.kind == "noise":
            device = next(self.old.solver.parameters()).device
            return torch.randn(n, *shape, device=device).clamp_(-1, 1)
        if self.kind == "current":
            return current
        return None


def random_batch(task: Task, n: int):
    idx = torch.randint(len(task.x_train), (n,), device=task.x_train.device)
    return task.x_train[idx], task.y_train[idx]


def critic_step(s: Scholar, x_real: torch.Tensor, lam: float) -> torch.Tensor:
    """One WGAN-GP critic step; the three critic inputs (real, fake, interpolated) go in one batch."""
    n = len(x_real)
    x_fake = s.sample(n)
    eps = torch.rand(n, 1, 1, 1, device=x_real.device)
    x_hat = (eps * x_real + (1 - eps) * x_fake).requires_grad_(True)
    scores = s.critic(torch.cat([x_real, x_fake, x_hat]))
    grad, = torch.autograd.grad(scores[2 * n:].sum(), x_hat, create_graph=True)
    loss = scores[n:2 * n].mean() - scores[:n].mean() + gradient_penalty(grad, lam)
    s.critic_opt.zero_grad(set_to_none=True)
    loss.backward()
    s.critic_opt.step()
    return loss.detach()


def generator_step(s: Scholar, n: int) -> torch.Tensor:
    """One generator step: raise the critic's score of fresh samples."""
    z = torch.randn(n, s.z_dim, device=next(s.generator.parameters()).device)
    s.critic.requires_grad_(False)
    loss = -s.critic(s.generator(z)).mean()
    s.gen_opt.zero_grad(set_to_none=True)
    loss.backward()
    s.gen_opt.step()
    s.critic.requires_grad_(True)
    return loss.detach()


def generator_inputs(task: Task, replay: Replay, r: float, n: int) -> torch.Tensor:
    """The generator's 'real' batch on task i: share r of real task-i inputs, 1-r of old-generator samples."""
    n_real = n if replay.kind != "gr" else round(r * n)
    x_real = random_batch(task, n_real)[0]
    return x_real if n_real == n else torch.cat([x_real, replay.old.sample(n - n_real)])


def solver_step(s: Scholar, task: Task, replay: Replay, r: float, batch: int) -> torch.Tensor:
    """One solver step on r*CE(S(x), y) + (1-r)*CE(S(x'), S_old(x'))."""
    x, y = random_batch(task, batch if r > 0 else 0)
    x_rep = replay.inputs(batch, s.shape, current=x) if r < 1 else None
    if x_rep is None:
        x_rep, r = x[:0], 1.0
    targets = replay.old.label(x_rep, replay.head, replay.soft, replay.temperature) if len(x_rep) else y[:0]
    if replay.head == task.head:   # one forward pass for both batches (the solver has no batch norm)
        logits = s.solver(torch.cat([x, x_rep]), task.head)
        logits_real, logits_rep = logits[:len(x)], logits[len(x):]
    else:
        logits_real, logits_rep = s.solver(x, task.head), s.solver(x_rep, replay.head)
    if replay.temperature != 1.0 and len(x_rep):
        # distillation (Hinton et al.): CE(z/T, softmax(z_old/T)) * T^2; r*A + (1-r)*T^2*B is written as
        # scale * (r'*A + (1-r')*B) so that the one fused loss serves
        scale = r + (1 - r) * replay.temperature ** 2
        loss = scale * replay_loss(logits_real, y, logits_rep / replay.temperature, targets, r / scale)
    else:
        loss = replay_loss(logits_real, y, logits_rep, targets, r)
    if replay.ewc:
        loss = loss + ewc_penalty(s.solver, replay.ewc)
    s.solver_opt.zero_grad(set_to_none=True)
    loss.backward()
    s.solver_opt.step()
    return loss.detach()


def ewc_penalty(solver: Solver, ewc: dict) -> torch.Tensor:
    """lambda/2 * sum_i F_i (theta_i - theta*_i)^2 over the solver's weights."""
    return 0.5 * ewc["lam"] * sum((f * (p - a) ** 2).sum() for p, f, a in zip(solver.parameters(), ewc["fisher"], ewc["anchor"]))


def ewc_update(ewc: dict | None, solver: Solver, task: Task, b: Budget) -> dict:
    """Online EWC (Schwarz et al. 2018): add the task's diagonal Fisher, estimated on b.fisher_samples
    training images one at a time with the model's own predicted labels; anchor at the current weights."""
    params = list(solver.parameters())
    fisher = [torch.zeros_like(p) for p in params]
    idx = torch.randperm(len(task.x_train), device=task.x_train.device)[:b.fisher_samples]
    solver.eval()
    for i in idx:
        logits = solver(task.x_train[i:i + 1], task.head)
        grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), params)
        for f, g in zip(fisher, grads):
            f += g.detach() ** 2 / len(idx)
    solver.train()
    if ewc:
        fisher = [old + new for old, new in zip(ewc["fisher"], fisher)]
    return {"fisher": fisher, "anchor": [p.detach().clone() for p in params], "lam": b.ewc_lambda}


@torch.no_grad()
def accuracy(solver: Solver, tasks: list[Task], chunk: int = 2000) -> list[float]:
    """Test accuracy (%) on each task, each with its own head."""
    was_training = solver.training
    solver.eval()
    accs = []
    for t in tasks:
        correct = sum(int((solver(x, t.head).argmax(1) == y).sum())
                      for x, y in zip(t.x_test.split(chunk), t.y_test.split(chunk)))
        accs.append(100.0 * correct / max(1, len(t.y_test)))
    solver.train(was_training)
    return accs


STEP_KINDS = ("solver", "replay solver", "generator", "replay generator")   # steps that cost differently


class Progress:
    """Progress lines with rate and ETA. The ETA adds up, for each kind of step (STEP_KINDS; a generator
    step counts with its critic steps), the steps left times the seconds per step measured so far; a
    kind not yet seen uses its calibrated cost (`step_costs`), scaled by how far the kinds already
    measured strayed from theirs. So a GR run, whose generator steps cost ~100x a solver step on a CPU,
    gets a right ETA from its first generator progress line."""

    def __init__(self, label: str, plan: dict[str, int], cost: dict[str, float] | None = None,
                 quiet: bool = False, clock=time.monotonic):
        self.label, self.quiet, self.clock = label, quiet, clock
        self.plan, self.cost = dict(plan), dict(cost or {})
        self.done = {k: 0 for k in self.plan}
        self.seconds = {k: 0.0 for k in self.plan}
        self.last = self.mark = clock()
        self.mark_done = 0

    def skip(self, counts: dict[str, int]) -> None:
        """Steps finished before a resume: out of the plan, without a time."""
        for kind, n in counts.items():
            self.plan[kind] = self.plan.get(kind, 0) - n

    def advance(self, kind: str, n: int = 1) -> None:
        now = self.clock()
        self.plan.setdefault(kind, 0)
        self.seconds[kind] = self.seconds.get(kind, 0.0) + now - self.last
        self.done[kind] = self.done.get(kind, 0) + n
        self.last = now

    def eta(self) -> float:
        seen = [k for k in self.plan if self.done.get(k)]
        calibrated = sum(self.done[k] * self.cost.get(k, 0.0) for k in seen)
        scale = sum(self.seconds[k] for k in seen) / calibrated if calibrated > 0 else 1.0
        left = 0.0
        for kind, total in self.plan.items():
            done = self.done.get(kind, 0)
            per_step = self.seconds[kind] / done if done else self.cost.get(kind, 0.0) * scale
            left += max(0, total - done) * per_step
        return left

    def line(self, text: str) -> None:
        now, done = self.clock(), sum(self.done.values())
        rate = (done - self.mark_done) / max(1e-9, now - self.mark)
        self.mark, self.mark_done = now, done
        if not self.quiet:
            print(f"{self.label} | {text} | {rate:.1f} it/s | ETA {fmt_seconds(self.eta())}", flush=True)


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def task_plan(b: Budget, replays: bool, train_generator: bool, warmup: bool = False) -> dict[str, int]:
    """Steps of one task by kind (STEP_KINDS); the LwF head warm-up counts as solver steps."""
    plan = {"replay solver" if replays else "solver": b.solver_iters}
    if warmup and b.warmup_iters:
        plan["solver"] = plan.get("solver", 0) + b.warmup_iters
    if train_generator:
        plan["replay generator" if replays else "generator"] = b.gen_iters
    return plan


def add_plans(plans) -> dict[str, int]:
    total: dict[str, int] = {}
    for plan in plans:
        for kind, n in plan.items():
            total[kind] = total.get(kind, 0) + n
    return total


def step_costs(shape, b: Budget, device, generative: bool, n_heads: int = 1, reps: int = 2) -> dict[str, float]:
    """Seconds per step of each kind (STEP_KINDS), timed on random inputs of `shape` (after one warm-up
    step); the random streams of the caller are left as they were."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        s = Scholar(shape, b, n_heads, with_generator=generative).to(device)
        x = torch.rand(256, *shape, device=device) * 2 - 1
        task = Task("calibration", x, torch.randint(10, (256,), device=device), x, None)
        old = s.frozen_copy()
        replay = Replay("gr" if generative else "noise", old)
        steps = {"solver": lambda: solver_step(s, task, Replay(), 1.0, b.batch),
                 "replay solver": lambda: solver_step(s, task, replay, 0.5, b.batch)}
        if generative:
            def generator_iteration(rep):
                for _ in range(b.n_critic):
                    critic_step(s, generator_inputs(task, rep, 0.5, b.gen_batch), b.lam)
                generator_step(s, b.gen_batch)
            steps["generator"] = lambda: generator_iteration(Replay())
            steps["replay generator"] = lambda: generator_iteration(replay)
        costs = {}
        for kind, step in steps.items():
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            costs[kind] = (time.perf_counter() - t0) / reps
    return costs


class RunStopped(Exception):
    """A run cannot go on (exit 3): its message names the last checkpoint to resume from."""


class Diverged(RunStopped):
    """A non-finite loss or weight: the run stops rather than poison what follows or its checkpoint."""


def check_finite(where: str, **losses) -> None:
    for name, value in losses.items():
        if not math.isfinite(float(value)):
            raise Diverged(f"non-finite {name} loss ({float(value)}) at {where}")


def first_non_finite(obj, name: str = "") -> str | None:
    """The name of the first floating tensor in a (nested) dict/list that holds a NaN or inf, else None."""
    if isinstance(obj, torch.Tensor):
        return name if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        bad = first_non_finite(value, f"{name}.{key}" if name else str(key))
        if bad:
            return bad
    return None


class Checkpoint:
    """A run's checkpoint file, written atomically (temp file + rename) at every task boundary and every
    `every` steps inside a task. `snapshot()` (set by the run) returns what the run has learnt so far."""

    def __init__(self, path: str | None = None, every: int = 0, fingerprint: dict | None = None):
        self.path, self.every, self.fingerprint = path, every, fingerprint or {}
        self.stage, self.snapshot = 0, dict
        self.started, self.earlier = time.time(), 0.0

    def due(self, step: int) -> bool:
        return bool(self.path and self.every and step % self.every == 0)

    def save(self, phase: str, step: int, stage: int | None = None) -> None:
        if not self.path:
            return
        position = {"stage": self.stage if stage is None else stage, "phase": phase, "step": step}
        learnt = self.snapshot()
        bad = first_non_finite(learnt)   # one host sync per save; a poisoned state never replaces a good one
        if bad:
            raise Diverged(f"non-finite values in {bad} at task {position['stage'] + 1} {phase} step {step}, not saved")
        state = {"fingerprint": self.fingerprint, "rng": rng_state(), **learnt, "elapsed": self.elapsed(),
                 "position": position}
        with replacing(self.path) as tmp:
            torch.save(state, tmp)

    def elapsed(self) -> float:
        """Seconds this run has trained, earlier sessions (before a resume) included."""
        return self.earlier + time.time() - self.started

    def load(self) -> dict | None:
        """The saved state, None if there is none; UsageError if it is unreadable or from another run."""
        if not self.path or not os.path.exists(self.path):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            saved = state["fingerprint"]
        except Exception as e:
            raise UsageError(f"checkpoint {self.path} is unreadable ({type(e).__name__}); delete it or pass --overwrite") from None
        if saved != self.fingerprint:
            raise UsageError(f"checkpoint {self.path} {other_run(saved, self.fingerprint)}; "
                             "pass --overwrite to start afresh or choose another --out")
        self.earlier = state.get("elapsed", 0.0)
        return state


def fingerprint_diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k} {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)) or "nothing"


def rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def scholar_state(s: Scholar) -> dict:
    opts = {name: getattr(s, name).state_dict() for name in ("solver_opt", "gen_opt", "critic_opt") if hasattr(s, name)}
    return {"model": s.state_dict(), **opts}


def load_scholar_state(s: Scholar, state: dict) -> Scholar:
    s.load_state_dict(state["model"])
    for name, opt_state in state.items():
        if name != "model":
            getattr(s, name).load_state_dict(opt_state)
    return s


def train_task(s: Scholar, task: Task, replay: Replay, r: float, b: Budget, *, train_generator: bool = True,
               eval_tasks: list[Task] = (), progress: Progress | None = None, on_samples=None, step0: int = 0,
               curves: list | None = None, checkpoint: Checkpoint | None = None, start: dict | None = None) -> list[dict]:
    """Train scholar `s` on `task` with replay from the previous scholar; return the accuracy curve.

    The solver takes b.solver_iters steps on r*CE(real) + (1-r)*CE(replayed); the generator (if any and
    train_generator) takes b.gen_iters WGAN-GP steps on the r-mix of real inputs and old samples.
    `on_samples(gen_step, samples)` is called at the generator steps listed in b.sample_at. Evaluation
    points go to `curves`; `checkpoint` is saved every checkpoint.every steps, `start` ({phase, step})
    continues a task from such a checkpoint."""
    replays = replay.kind != "none"
    progress = progress or Progress(task.name, task_plan(b, replays, train_generator, replays), quiet=True)
    checkpoint = checkpoint or Checkpoint()
    curves = [] if curves is None else curves
    phase, done = (start or {}).get("phase", "start"), (start or {}).get("step", 0)
    if phase == "start":
        s.solver_opt = torch.optim.Adam(s.solver.parameters(), lr=b.solver_lr)   # fresh moments for each task
        if b.warmup_iters and replay.kind != "none":
            warm_up_head(s, task, b, progress)
        phase, done = "solver", 0
    if phase == "solver":
        for step in range(done + 1, b.solver_iters + 1):
            if b.solver_schedule == "cosine":
                for group in s.solver_opt.param_groups:
                    group["lr"] = b.solver_lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / b.solver_iters))
            loss = solver_step(s, task, replay, r, b.batch)
            progress.advance("replay solver" if replays else "solver")
            if step % b.eval_every == 0 or step == b.solver_iters:
                check_finite(f"task {task.name} solver step {step}", solver=loss)
                accs = accuracy(s.solver, eval_tasks) if eval_tasks else []
                avg = sum(accs) / max(1, len(accs))
                curves.append({"task": task.name, "step": step0 + step, "acc": accs, "avg": avg, "loss": float(loss)})
                progress.line(f"task {task.name} solver {step}/{b.solver_iters} loss {float(loss):.3f} | acc "
                              + " ".join(f"{a:.1f}" for a in accs) + f" | avg {avg:.2f}")
            if checkpoint.due(step):
                checkpoint.save("solver", step)
        phase, done = "generator", 0
    if train_generator and s.generator is not None:
        train_generator_on(s, task, replay, r, b, progress, on_samples, first=done + 1, checkpoint=checkpoint,
                           kind="replay generator" if replays else "generator")
    return curves


def warm_up_head(s: Scholar, task: Task, b: Budget, progress: Progress):
    """LwF: train the new task's head alone on real data before fine-tuning everything."""
    head = s.solver.heads[task.head]
    opt = torch.optim.Adam(head.parameters(), lr=b.solver_lr)
    for _ in range(b.warmup_iters):
        x, y = random_batch(task, b.batch)
        with torch.no_grad():
            features = s.solver.trunk(x)
        loss = F.cross_entropy(head(features), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.advance("solver")
    loss = loss.detach()
    check_finite(f"task {task.name} head warm-up", warm_up=loss)
    progress.line(f"task {task.name} head warm-up {b.warmup_iters} steps loss {float(loss):.3f}")


def train_generator_on(s: Scholar, task: Task, replay: Replay, r: float, b: Budget, progress: Progress, on_samples=None,
                       first: int = 1, checkpoint: Checkpoint | None = None, kind: str = "generator"):
    log_every = max(1, b.gen_iters // max(1, b.solver_iters // b.eval_every))
    for step in range(first, b.gen_iters + 1):
        for _ in range(b.n_critic):
            critic_loss = critic_step(s, generator_inputs(task, replay, r, b.gen_batch), b.lam)
        gen_loss = generator_step(s, b.gen_batch)
        progress.advance(kind)
        if on_samples and step in b.sample_at:
            on_samples(step, s.sample(SAMPLES_PER_ROW))
        if step % log_every == 0 or step == b.gen_iters:
            check_finite(f"task {task.name} generator step {step}", critic=critic_loss, generator=gen_loss)
            progress.line(f"task {task.name} generator {step}/{b.gen_iters} critic {float(critic_loss):.3f} "
                          f"generator {float(gen_loss):.3f}")
        if checkpoint and checkpoint.due(step):
            checkpoint.save("generator", step)


SAMPLES_PER_ROW = 10


# ----------------------------------------------------------------------------------------------------
# Experiments. Each run (experiment, variant, seed) returns a JSON-able dict; sample rows go to PNG.


def replay_share(args: Args, i: int) -> float:
    """Real-data share on task i (0-based): --r, or 1/(i+1) so that every task seen weighs the same."""
    return 1.0 if i == 0 else (args.r if args.r is not None else 1.0 / (i + 1))


def run_sequence(tasks: list[Task], kind: str, args: Args, b: Budget, label: str, *, n_heads: int = 1,
                 samples_each_step: bool = False, samples_each_task: bool = False,
                 checkpoint: Checkpoint | None = None, costs: dict | None = None) -> dict:
    """Learn tasks one after another with replay `kind`; accuracy on all tasks after each one."""
    shape = tuple(tasks[0].x_train.shape[1:])
    generative = kind in ("gr", "gr+distill")
    s = Scholar(shape, b, n_heads, with_generator=generative).to(tasks[0].x_train.device)
    plans = sequence_plans(len(tasks), kind, b, train_last_generator=samples_each_step or samples_each_task)
    run = {"curves": [], "acc_after": [], "samples": {}, "old": None, "ewc": None}
    checkpoint, pos = resume_run(checkpoint, lambda: s, run)
    progress = Progress(label, add_plans(plans), costs)
    progress.skip(add_plans(plans[:pos["stage"]]))
    for i in range(pos["stage"], len(tasks)):
        task, checkpoint.stage = tasks[i], i
        start = pos if i == pos["stage"] else {"phase": "start", "step": 0}
        if start["phase"] == "start":
            run["old"] = s.frozen_copy() if i > 0 and kind not in ("none", "ewc") else None
        replay = make_replay(kind, args, run["old"], [t.x_train for t in tasks[:i]], tasks[i - 1].head if i else 0)
        if kind == "ewc" and run["ewc"]:
            replay = Replay("ewc", ewc=run["ewc"])
        task_b = b if i > 0 else dataclasses.replace(b, warmup_iters=0)
        keep = (lambda step, x, i=i: run["samples"].setdefault(f"task{i + 1}", []).append((step, x))) if samples_each_step else None
        train_task(s, task, replay, replay_share(args, i) if replay.kind not in ("none", "ewc") else 1.0, task_b,
                   train_generator=trains_generator(plans[i]), eval_tasks=tasks[:i + 1], progress=progress, on_samples=keep,
                   step0=i * b.solver_iters, curves=run["curves"], checkpoint=checkpoint, start=start)
        run["acc_after"].append(accuracy(s.solver, tasks))
        if kind == "ewc" and i < len(tasks) - 1:
            run["ewc"] = ewc_update(run["ewc"], s.solver, task, b)
        if samples_each_task and s.generator is not None:
            run["samples"].setdefault("tasks", []).append((i + 1, s.sample(SAMPLES_PER_ROW)))
        run["old"] = None
        checkpoint.save("start", 0, stage=i + 1)
    final = run["acc_after"][-1]
    return {"tasks": [t.name for t in tasks], "curves": run["curves"], "acc_after_task": run["acc_after"],
            "final": {"acc": final, "avg": sum(final) / len(tasks)}, "samples": run["samples"]}


def sequence_plans(n_tasks: int, kind: str, b: Budget, train_last_generator: bool) -> list[dict[str, int]]:
    """Steps by kind of each task of run_sequence. The generator of the last task serves no later task:
    it is trained only when its samples are shown."""
    generative = kind in ("gr", "gr+distill")
    return [task_plan(b, replays=i > 0 and kind != "none", warmup=i > 0 and kind != "none",
                      train_generator=generative and (i < n_tasks - 1 or train_last_generator)) for i in range(n_tasks)]


def chain_plans(kind: str, b: Budget, links: int) -> list[dict[str, int]]:
    """Steps by kind of each link of run_chain; without replay, links after the first learn nothing."""
    generative = kind in ("gr", "gr+distill")
    return [task_plan(b, replays=k > 0, train_generator=generative and k < links - 1) if k == 0 or kind != "none" else {}
            for k in range(links)]


def trains_generator(plan: dict[str, int]) -> bool:
    return bool(plan.get("generator") or plan.get("replay generator"))


def make_replay(kind: str, args: Args, old: Scholar | None, pool: list, head: int) -> Replay:
    """The replay of variant `kind` from the previous scholar `old` (none on the first task)."""
    if old is None:
        return Replay()
    if kind == "gr+distill":
        return Replay("gr", old, head=head, soft=True, temperature=args.temperature)
    return Replay(kind, old, pool, head=head, soft=args.replay_targets == "soft")


def resume_run(checkpoint: Checkpoint | None, scholar, run: dict) -> tuple[Checkpoint, dict]:
    """Hook the run's state (the scholar `scholar()` returns now, the dict `run`, its run["old"] scholar)
    to the checkpoint and, if one was saved, load it into them; return the checkpoint and the position
    to continue from. `scholar` is a getter because a run may replace its scholar (chain: one per link)."""
    checkpoint = checkpoint or Checkpoint()
    checkpoint.snapshot = lambda: {"scholar": scholar_state(scholar()), "run": {
        **run, "old": run["old"].state_dict() if run["old"] is not None else None}}
    saved = checkpoint.load()
    if saved is None:
        return checkpoint, {"stage": 0, "phase": "start", "step": 0}
    s = load_scholar_state(scholar(), saved["scholar"])
    old_state = saved["run"].pop("old")
    run.update(saved["run"])
    if old_state is not None:
        run["old"] = s.frozen_copy()
        run["old"].load_state_dict(old_state)
    set_rng_state(saved["rng"])
    print(f"resuming from {checkpoint.path} at task {saved['position']['stage'] + 1}, "
          f"{saved['position']['phase']} step {saved['position']['step']}", flush=True)
    return checkpoint, saved["position"]


def run_chain(task: Task, kind: str, args: Args, b: Budget, label: str, links: int = 5,
              checkpoint: Checkpoint | None = None, costs: dict | None = None) -> dict:
    """Table 1: scholar 1 learns MNIST; scholar k>1 learns only from scholar k-1's samples and labels."""
    shape = tuple(task.x_train.shape[1:])
    plans = chain_plans(kind, b, links)
    generative = kind in ("gr", "gr+distill")
    new_scholar = lambda: Scholar(shape, b, with_generator=generative).to(task.x_train.device)
    s = new_scholar()
    run = {"curves": [], "acc_after": [[]], "samples": {}, "old": None}   # "old": the previous link's scholar
    checkpoint, pos = resume_run(checkpoint, lambda: s, run)   # the getter sees each link's new scholar
    progress = Progress(label, add_plans(plans), costs)
    progress.skip(add_plans(plans[:pos["stage"]]))
    for k in range(pos["stage"], links):
        checkpoint.stage = k
        start = pos if k == pos["stage"] else {"phase": "start", "step": 0}
        if k > 0 and start["phase"] == "start":
            s = new_scholar()   # each link learns from scratch
        replay = make_replay(kind, args, run["old"] if k else None, [task.x_train], 0)
        if plans[k]:
            train_task(s, task, replay, 1.0 if k == 0 else 0.0, b, train_generator=k < links - 1, eval_tasks=[task],
                       progress=progress, step0=k * b.solver_iters, curves=run["curves"], checkpoint=checkpoint, start=start)
        run["acc_after"][0].append(accuracy(s.solver, [task])[0])
        if s.generator is not None and k < links - 1:
            run["samples"].setdefault("links", []).append((k + 1, s.sample(SAMPLES_PER_ROW)))
        run["old"] = s.frozen_copy()
        checkpoint.save("start", 0, stage=k + 1)
    accs = run["acc_after"][0]
    return {"tasks": [f"solver{k + 1}" for k in range(links)], "curves": run["curves"], "acc_after_task": [accs],
            "final": {"acc": accs, "avg": sum(accs) / links}, "samples": run["samples"]}


MNIST28_EXPERIMENTS = ("chain", "permuted", "split")   # 28x28x1 MNIST, MLP solver; the others 32x32x3, CNN


def load_data(exp: str, args: Args, device) -> dict:
    """The base datasets an experiment needs, loaded once for all its runs."""
    if exp in MNIST28_EXPERIMENTS:
        return {"mnist": load_mnist(args.data_dir, device)}
    return {"mnist": load_mnist(args.data_dir, device, rgb32=True), "svhn": load_svhn(args.data_dir, device)}


def run_one(exp: str, variant: str, seed: int, args: Args, data: dict, b: Budget,
            checkpoint: Checkpoint | None = None, costs: dict | None = None) -> dict:
    """One run (experiment, variant, seed) from scratch, or from `checkpoint` if it holds one; `costs`
    (seconds per step of each kind, from step_costs) feed the ETA before a kind has been timed."""
    torch.manual_seed(seed)
    names = LWF_NAMES if exp == "lwf" else VARIANT_NAMES
    label, ck = f"{exp} {names[variant]} seed {seed}", {"checkpoint": checkpoint, "costs": costs}
    if exp == "chain":
        return run_chain(make_task("mnist", data["mnist"], b, seed), variant, args, b, label, **ck)
    if exp == "permuted":
        return run_sequence(permuted_tasks(data["mnist"], b, seed), variant, args, b, label, **ck)
    if exp == "split":
        return run_sequence(split_tasks(data["mnist"], b, seed), variant, args, b, label, samples_each_task=True, **ck)
    if exp == "lwf":
        tasks = [make_task("svhn", data["svhn"], b, seed, head=0), make_task("mnist", data["mnist"], b, seed, head=1)]
        return run_sequence(tasks, "current" if variant == "none" else variant, args, b, label, n_heads=2, **ck)
    first, second = exp.split("-")
    tasks = [make_task(first, data[first], b, seed), make_task(second, data[second], b, seed)]
    return run_sequence(tasks, variant, args, b, label, samples_each_step=True, **ck)


def run_plan(exp: str, variant: str, b: Budget) -> list[dict[str, int]]:
    """Steps by kind of each task of the run that run_one makes, without running it."""
    if exp == "chain":
        return chain_plans(variant, b, links=5)
    n_tasks = {"permuted": b.n_tasks, "split": len(SPLIT_CLASSES)}.get(exp, 2)
    kind = "current" if exp == "lwf" and variant == "none" else variant
    return sequence_plans(n_tasks, kind, b, train_last_generator=exp in ("split", "mnist-svhn", "svhn-mnist"))


def expected_time(exp: str, b: Budget, variants: list[str], device) -> tuple[float, dict[str, float]]:
    """Expected seconds of runs of `variants` (one entry per run) and the step costs it rests on."""
    if not variants:
        return 0.0, {}
    shape = (1, 28, 28) if exp in MNIST28_EXPERIMENTS else (3, 32, 32)
    generative = any(v in ("gr", "gr+distill") for v in variants)
    costs = step_costs(shape, b, device, generative, n_heads=2 if exp == "lwf" else 1)
    seconds = sum(n * costs[kind] for v in variants for kind, n in add_plans(run_plan(exp, v, b)).items())
    return seconds, costs


def run_fingerprint(exp: str, variant: str, seed: int, args: Args, b: Budget) -> dict:
    """What makes two runs the same run: a checkpoint or result resumes only under the same fingerprint."""
    return json.loads(json.dumps({"exp": exp, "variant": variant, "seed": seed, "preset": args.preset, "r": args.r,
                                  "replay_targets": args.replay_targets, "temperature": args.temperature,
                                  **dataclasses.asdict(b)}))   # as JSON has it


def plan_runs(exp: str, args: Args, b: Budget, folder: str) -> list[tuple[str, int, str, Checkpoint]]:
    """The runs to do, each (variant, seed, stem, checkpoint); checks what --out already holds first,
    so that a refusal (exit 2) happens before anything in it is overwritten. With --estimate it reads
    --out as --resume would and changes nothing."""
    runs, held = [], []
    resume = args.resume or (args.estimate and not args.overwrite)
    for variant in variant_list(args):
        for seed in range(args.seeds):
            stem = os.path.join(folder, f"{variant}_seed{seed}")
            fingerprint = run_fingerprint(exp, variant, seed, args, b)
            checkpoint = Checkpoint(stem + ".ckpt", args.checkpoint_every, fingerprint)
            done = os.path.exists(stem + ".json")
            if (done or os.path.exists(checkpoint.path)) and not args.overwrite:
                held.append(stem)
            if resume and os.path.exists(checkpoint.path):
                checkpoint.load()                       # unreadable or another run's: UsageError now
            elif resume and done:
                with open(stem + ".json") as f:
                    saved = json.load(f).get("fingerprint", {})
                if saved != fingerprint:
                    raise UsageError(f"{stem}.json {other_run(saved, fingerprint)}; pass --overwrite to replace it "
                                     "or choose another --out")
                print(f"{stem}.json: finished earlier, kept", flush=True)
                continue
            elif args.overwrite and not args.estimate and os.path.exists(checkpoint.path):
                os.remove(checkpoint.path)
            runs.append((variant, seed, stem, checkpoint))
    if held and not (resume or args.overwrite):
        raise UsageError(f"{folder} already holds results or checkpoints of these runs ({len(held)}): pass --resume to "
                         "continue them, --overwrite to replace them, or choose another --out")
    return runs


def other_run(saved: dict, fingerprint: dict) -> str:
    """Why a saved result or checkpoint is not this run's: another version of dgr.py, or other settings."""
    if set(saved) != set(fingerprint):
        missing, extra = sorted(set(fingerprint) - set(saved)), sorted(set(saved) - set(fingerprint))
        return ("was written by another version of dgr.py (its settings " + "; ".join(
            part for part in (missing and "lack " + ", ".join(missing), extra and "have " + ", ".join(extra)) if part) + ")")
    return f"belongs to another run (differs in: {fingerprint_diff(saved, fingerprint)})"


def prepare_experiment(exp: str, args: Args) -> tuple[Budget, str, list]:
    """Budget, folder and runs to do of one experiment; refuses bad combinations and conflicts in --out."""
    b = budget_for(args, exp)
    if "ewc" in variant_list(args) and exp not in EWC_EXPERIMENTS:
        raise UsageError(f"variant ewc applies to {' and '.join(EWC_EXPERIMENTS)}, not {exp}")
    if exp == "lwf" and "gr+distill" in variant_list(args):
        raise UsageError("lwf already distils (LwF); its variants are gr, er, noise, none")
    folder = os.path.join(args.out, exp)
    return b, folder, plan_runs(exp, args, b, folder)


def check_writable(folder: str) -> None:
    """Make `folder` and write a file in it, or one UsageError naming the folder and the reason."""
    import tempfile
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"cannot write results to {os.path.abspath(folder)} ({e.strerror or e}); "
                         "choose another --out") from None


def announce(exp: str, b: Budget, runs: list, device) -> tuple[float, dict[str, float]]:
    """Print the runs to do and their expected time (from step costs timed here); return both."""
    seconds, costs = expected_time(exp, b, [variant for variant, *_ in runs], device)
    if runs:
        per_step = ", ".join(f"{kind} {1e3 * c:.1f} ms" for kind, c in costs.items())
        print(f"{exp}: {len(runs)} run(s) to do, expected about {fmt_seconds(seconds)} on {machine_name(device)} "
              f"(per step: {per_step}; a generator step includes its {b.n_critic} critic steps)", flush=True)
    else:
        print(f"{exp}: nothing to do", flush=True)
    return seconds, costs


def run_experiment(exp: str, args: Args, device, b: Budget, folder: str, runs: list, costs: dict) -> str:
    """All planned runs of one experiment: JSON per run, figures and summary.md in <out>/<exp>."""
    data = load_data(exp, args, device)
    names = LWF_NAMES if exp == "lwf" else VARIANT_NAMES
    for variant, seed, stem, checkpoint in runs:
        checkpoint.started = time.time()
        try:
            result = run_one(exp, variant, seed, args, data, b, checkpoint, costs)
            samples = result.pop("samples")
            result.update(exp=exp, variant=variant, name=names[variant], seed=seed,
                          wall_time_s=round(checkpoint.elapsed(), 2), machine=machine_name(device),
                          fingerprint=checkpoint.fingerprint,
                          config={"args": dataclasses.asdict(args), "budget": dataclasses.asdict(b)})
            write_json(stem + ".json", result)
            for key, rows in samples.items():
                save_sample_rows([x for _, x in rows], f"{stem}_samples_{key}.png")
        except (Diverged, OSError) as e:
            what = f"{exp} {names[variant]} seed {seed}: " + (str(e) if isinstance(e, Diverged) else f"writing failed ({e})")
            last = (f"the last checkpoint is {checkpoint.path}" if os.path.exists(checkpoint.path)
                    else "no checkpoint was saved")
            hint = "--detect-anomaly to find the operation" if isinstance(e, Diverged) else "free space or choose another --out"
            raise RunStopped(f"{what}; {last} (rerun with --resume after a fix; {hint})") from None
        if os.path.exists(checkpoint.path):
            os.remove(checkpoint.path)
        print(f"{exp} {names[variant]} seed {seed}: final avg {result['final']['avg']:.2f} % "
              f"in {fmt_seconds(result['wall_time_s'])} -> {stem}.json", flush=True)
    plot_experiment(folder)
    return write_summary(folder)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


@contextlib.contextmanager
def replacing(path: str):
    """Yields a temp path to write; renamed over `path` once written, so no reader sees half a file
    (a failed write removes the temp file and leaves `path` as it was)."""
    tmp = path + ".tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def machine_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------------------------------
# Figures and tables, made from the results JSON in an experiment folder.


def save_sample_rows(rows: list[torch.Tensor], path: str) -> None:
    """Sample grid: one row per stage (task, link or generator step), images mapped from [-1, 1]."""
    from torchvision.utils import save_image
    grid = torch.cat([r[:SAMPLES_PER_ROW].detach().float().cpu() for r in rows])
    with replacing(path) as tmp:
        save_image(grid, tmp, format="png", nrow=SAMPLES_PER_ROW, normalize=True, value_range=(-1, 1), pad_value=1.0)


def load_results(folder: str) -> list[dict]:
    files = sorted(f for f in os.listdir(folder) if f.endswith(".json") and "_seed" in f)
    results = []
    for f in files:
        with open(os.path.join(folder, f)) as fh:
            results.append(json.load(fh))
    return results


def plot_experiment(folder: str) -> str:
    """accuracy.png: one panel per variant (accuracy of each task during training), one with the averages."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = [r for r in load_results(folder) if r["seed"] == 0] or load_results(folder)
    results.sort(key=lambda r: VARIANTS.index(r["variant"]))
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(4 * (len(results) + 1), 3.4), squeeze=False)
    for ax, res in zip(axes[0], results):
        for j, name in enumerate(res["tasks"]):
            pts = [(c["step"], c["acc"][j]) for c in res["curves"] if len(c["acc"]) > j and res["exp"] != "chain"]
            if res["exp"] == "chain":
                pts = [(c["step"], c["acc"][0]) for c in res["curves"] if c["step"] // max(1, res["config"]["budget"]["solver_iters"] + 1) == j]
            if pts:
                ax.plot(*zip(*pts), label=name)
        ax.set(title=res["name"], xlabel="solver step", ylabel="test accuracy (%)", ylim=(0, 100))
        ax.legend(fontsize=7)
    avg_ax = axes[0][-1]
    for res in results:
        if res["exp"] == "chain":
            avg_ax.plot(range(1, len(res["final"]["acc"]) + 1), res["final"]["acc"], marker="o", label=res["name"])
            avg_ax.set(xlabel="solver (generation)", title="Accuracy of each solver")
        else:
            avg_ax.plot([c["step"] for c in res["curves"]], [c["avg"] for c in res["curves"]], label=res["name"])
            avg_ax.set(xlabel="solver step", title="Average over tasks seen")
    avg_ax.set(ylabel="test accuracy (%)", ylim=(0, 100))
    avg_ax.legend(fontsize=7)
    fig.suptitle(os.path.basename(os.path.normpath(folder)))
    fig.tight_layout()
    path = os.path.join(folder, "accuracy.png")
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def mean_sd(xs: list[float]) -> str:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.2f} ± {sd:.2f}"


def write_summary(folder: str) -> str:
    """summary.md: final accuracy per task and average, mean ± sd over seeds, per variant."""
    by_variant: dict[str, list[dict]] = {}
    for res in load_results(folder):
        by_variant.setdefault(res["variant"], []).append(res)
    if not by_variant:
        return ""
    first = next(iter(by_variant.values()))[0]
    cols = first["tasks"]
    lines = [f"## {first['exp']} ({first['config']['args']['preset']} preset, {first['machine']})", "",
             "| variant | seeds | " + " | ".join(cols) + " | average | wall time (s) |",
             "|---" * (len(cols) + 4) + "|"]
    for variant in [v for v in VARIANTS if v in by_variant]:
        runs = by_variant[variant]
        per_task = [mean_sd([r["final"]["acc"][j] for r in runs]) for j in range(len(cols))]
        lines.append(f"| {runs[0]['name']} | {len(runs)} | " + " | ".join(per_task)
                     + f" | {mean_sd([r['final']['avg'] for r in runs])} | {mean_sd([r['wall_time_s'] for r in runs])} |")
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(folder, "summary.md"), text)
    return text


# ----------------------------------------------------------------------------------------------------
# Benchmark (--exp bench): the losses and whole training steps, reference vs fused, side by side.


def time_ms(fn, device, reps: int) -> float:
    """Median wall time of fn() in ms, after warm-up; CUDA timed with events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def bench_losses(device, batches, with_compile: bool, reps: int) -> list[dict]:
    """Forward + backward of each loss: eager reference, torch.compile of the reference, fused op."""
    rows = []
    for shape in ((1, 28, 28), (3, 32, 32)):
        for n in batches:
            g = (torch.randn(n, *shape, device=device) * 0.03).requires_grad_(True)
            lr, lp = torch.randn(n, 10, device=device, requires_grad=True), torch.randn(n, 10, device=device, requires_grad=True)
            y, t = torch.randint(10, (n,), device=device), torch.randn(n, 10, device=device).softmax(1)
            cases = {"gradient_penalty": (lambda f: torch.autograd.grad(f(g, 10.0), g), gradient_penalty_ref,
                                          lambda x, lam: torch.ops.dgr.gradient_penalty(x, lam)),
                     "replay_loss": (lambda f: torch.autograd.grad(f(lr, y, lp, t, 0.5), (lr, lp)), replay_loss_ref,
                                     lambda *a: torch.ops.dgr.replay_loss_fwd(*a)[0])}
            for op, (run, ref, fused) in cases.items():
                if op == "replay_loss" and shape != (1, 28, 28):
                    continue   # the replay loss sees logits only: one row per batch size
                row = {"op": op, "shape": "x".join(map(str, shape)) if op == "gradient_penalty" else "10 classes", "batch": n,
                       "eager_ms": time_ms(lambda: run(ref), device, reps)}
                if with_compile:
                    compiled = torch.compile(ref, dynamic=False)
                    row["compiled_ms"] = time_ms(lambda: run(compiled), device, reps)
                row["fused_ms"] = time_ms(lambda: run(fused), device, reps)
                if op == "gradient_penalty":   # fewest bytes: read g (forward), read g and write dg (backward)
                    row["fused_GBps"] = 3 * g.numel() * g.element_size() / (row["fused_ms"] * 1e6)
                rows.append(row)
    return rows


def bench_steps(device, batches, reps: int) -> list[dict]:
    """One whole critic step (WGAN-GP, width 64), generator step and solver step (GR replay, half real),
    with --impl torch and --impl ext."""
    rows = []
    for shape in ((1, 28, 28), (3, 32, 32)):
        s = Scholar(shape, Budget()).to(device)
        s.critic_opt.step = s.solver_opt.step = s.gen_opt.step = lambda: None   # time losses and gradients, keep weights
        task = Task("bench", torch.rand(4096, *shape, device=device) * 2 - 1, torch.randint(10, (4096,), device=device),
                    None, None)
        replay = Replay("gr", s.frozen_copy())
        for n in batches:
            x = task.x_train[:n]
            for step, run in (("critic step", lambda: critic_step(s, x, 10.0)),
                              ("generator step", lambda: generator_step(s, n)),   # no fused op: a control
                              ("solver step", lambda: solver_step(s, task, replay, 0.5, n))):
                row = {"op": step, "shape": "x".join(map(str, shape)), "batch": n}
                for impl in ("torch", "ext"):
                    set_impl(impl)
                    row["eager_ms" if impl == "torch" else "fused_ms"] = time_ms(run, device, reps)
                rows.append(row)
    set_impl("auto")
    return rows


def run_bench(args: Args, device) -> str:
    """Print and save (<out>/bench/bench.json, bench.md) the timings; ratios are eager time / time."""
    load_extension(required=True)
    quick = args.preset == "quick"
    batches, reps = ((64,), 5) if quick else ((64, 256, 1024), 50 if device.type == "cuda" else 10)
    rows = bench_losses(device, batches, with_compile=not quick, reps=reps) + bench_steps(device, batches, reps)
    lines = [f"## Benchmark ({machine_name(device)}, torch {torch.__version__}, median of {reps})", "",
             "| what | input | batch | eager ms | compiled ms (speed-up) | fused ms (speed-up) | fused GB/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        comp = f"{r['compiled_ms']:.3f} ({r['eager_ms'] / r['compiled_ms']:.2f}x)" if "compiled_ms" in r else "n/a"
        lines.append(f"| {r['op']} | {r['shape']} | {r['batch']} | {r['eager_ms']:.3f} | {comp} | "
                     f"{r['fused_ms']:.3f} ({r['eager_ms'] / r['fused_ms']:.2f}x) | "
                     + (f"{r['fused_GBps']:.1f}" if "fused_GBps" in r else "") + " |")
    text = "\n".join(lines) + "\n"
    folder = os.path.join(args.out, "bench")
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "bench.json"), {"machine": machine_name(device), "torch": torch.__version__, "rows": rows})
    with open(os.path.join(folder, "bench.md"), "w") as f:
        f.write(text)
    return text


# ----------------------------------------------------------------------------------------------------
# Entry point


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        device = resolve_device(args.device)
        if args.preset == "auto":
            args.preset = "paper" if device.type == "cuda" else "fast"
            print(f"preset {args.preset}: " + ("CUDA is available" if device.type == "cuda" else
                  "no CUDA; the paper preset's GR takes hours per run on a CPU (--preset paper to insist)"), flush=True)
        set_impl(args.impl)
        torch.autograd.set_detect_anomaly(args.detect_anomaly)
        if args.exp == "bench":
            print(run_bench(args, device))
            return 0
        planned = {exp: prepare_experiment(exp, args) for exp in (EXPERIMENTS if args.exp == "all" else (args.exp,))}
        if not args.estimate:   # every refusal (exit 2) before anything heavy starts
            for b, folder, runs in planned.values():
                check_writable(folder)
        expected = {exp: announce(exp, b, runs, device) for exp, (b, folder, runs) in planned.items()}
        if len(planned) > 1:
            print(f"expected in all: about {fmt_seconds(sum(seconds for seconds, _ in expected.values()))}", flush=True)
        if args.estimate:
            return 0
        summaries = [run_experiment(exp, args, device, *planned[exp], expected[exp][1]) for exp in planned]
    except UsageError as e:
        print(f"dgr.py: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"dgr.py: stopped: {e}", file=sys.stderr)
        return 3
    if len(summaries) > 1:
        write_text(os.path.join(args.out, "summary.md"), "\n".join(summaries))
    print("\n".join(summaries))
    print(f"results, figures and summary.md are in {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
