"""dgr.py: Continual Learning with Deep Generative Replay (Shin, Lee, Kim, Kim, NeurIPS 2017) in one file.

A *scholar* is a generator (a WGAN-GP) and a solver (a classifier). On task i the new generator learns a mix
of real task-i inputs (share r) and samples of the previous generator (share 1-r); the new solver minimises
r*CE(S(x), y) + (1-r)*CE(S(x'), S_old(x')), the replayed inputs x' labelled by the old solver. Variants: GR
(x' from the previous generator), ER (x' = real past inputs, the upper bound), Noise (x' = Gaussian noise),
None (plain fine-tuning); beyond the paper GR+distill (soft targets) and EWC.

    python dgr.py --exp split --preset quick        # a one-minute look at split MNIST
    python dgr.py --exp split                       # Fig. 6/7: fast preset on a CPU, paper preset with CUDA
    python dgr.py --exp all --estimate              # the expected time of every experiment, timed here
    python dgr.py --exp chain,split --seeds 3 --jobs 2   # two experiments, 3 seeds, two runs at a time
    python dgr.py --help

Reuse the method: `from dgr import Scholar, Task, Replay, train_task` (importing runs nothing).

Reading order. The method, standing alone: configuration and presets, data, models and the scholar, the two
losses, the variants, the experiments, the training steps, train_task, learn. Below the `# Plumbing` banner,
which the method never reaches into: the fused ops' loading, progress and expected time, checkpoints,
datasets on disk, running, figures and summaries, the command line.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import shlex
import signal
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------------------
# Configuration: a Budget per experiment, from a preset (paper, fast, quick), each field overridable.


@dataclass
class Budget:
    solver_iters: int = 2000      # solver steps per task
    gen_iters: int = 3000         # generator steps per task (each after n_critic critic steps)
    batch: int = 128              # solver batch: real inputs per step, and replayed ones unless replay_batch
    replay_batch: int = 0         # replayed inputs per solver step (0: batch); LwF's None distils the batch
    gen_batch: int = 64           # generator/critic batch
    eval_every: int = 250         # evaluate (and print progress) every k solver steps
    train_limit: int = 0          # use at most this many training images per task (0: all)
    test_limit: int = 0           # evaluate on at most this many test images per task (0: all)
    gan: str = "conv"             # conv: DCGAN convolutions; mlp: fully connected (far cheaper on a CPU)
    width: int = 64               # conv: base channels (critic 64-128-256); mlp: hidden units (z-w-2w-out)
    hidden: int = 400             # solver hidden units (784-400-400-10)
    dropout: float = 0.0          # solver: dropout after each hidden layer (0: none)
    cnn_channels: int = 32        # CNN solver channels (32-64) for images of several channels
    n_tasks: int = 10             # permuted MNIST tasks
    chain_init: str = "fresh"     # chain: each link starts from fresh weights, or from the previous link's
    warmup_iters: int = 0         # LwF: steps training the new head alone before fine-tuning all
    sample_at: tuple = ()         # generator steps at which sample grids are saved (Fig. 4)
    z_dim: int = 100
    n_critic: int = 5
    lam: float = 10.0             # gradient-penalty weight
    gen_lr: float = 1e-4          # Adam(0.5, 0.9) for the generator
    critic_lr: float = 0.0        # Adam(0.5, 0.9) for the critic (0: gen_lr; another value is the TTUR)
    solver_lr: float = 1e-3       # Adam(0.9, 0.999) for the solver
    solver_schedule: str = "constant"   # solver lr within each task: constant, or cosine (decays to 0)
    gan_schedule: str = "constant"      # generator and critic lr within each task: constant, or cosine
    gen_ema: float = 0.0          # decay of the generator's weight average that is replayed (0: the weights)
    gan_precision: str = "fp32"   # or bf16: the GAN's critic and generator steps under bf16 autocast
    ewc_lambda: float = 100.0     # online EWC penalty weight
    fisher_samples: int = 500     # training images per task for EWC's diagonal Fisher
    probe_iters: int = 1000       # steps of the fresh solver that measures each trained generator (0: none)
    last_generator: str = "train"   # or skip: the last task's generator (split, SVHN), shown, never replayed
    temperature: float = 2.0      # gr+distill: targets softmax(z/T) of the old solver, loss on z/T times T^2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if (why := budget_field_error(f.name, getattr(self, f.name))):
                raise ValueError(f"Budget.{why}")

    @property
    def effective_critic_lr(self) -> float:
        return self.critic_lr or self.gen_lr


BUDGET_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Budget)}
TYPE_NAMES = {int: "an integer", float: "a number", str: "a word", tuple: "steps (a:b:...)"}
BUDGET_CHOICES = {"gan": ("conv", "mlp"), "solver_schedule": ("constant", "cosine"),
                  "gan_schedule": ("constant", "cosine"), "chain_init": ("fresh", "previous"),
                  "last_generator": ("train", "skip"), "gan_precision": ("fp32", "bf16")}
BUDGET_FRACTIONS = ("gen_ema", "dropout")   # in [0, 1); below: those that may be 0 (counts >= 1, rates > 0)
BUDGET_MAY_BE_ZERO = ("replay_batch", "train_limit", "test_limit", "warmup_iters", "lam", "critic_lr",
                      "ewc_lambda", "probe_iters")


def budget_field_error(name: str, value) -> str | None:
    """Why `value` does not fit the Budget field `name` (its type, its choices, its range), or None."""
    kind = type(BUDGET_DEFAULTS[name])
    if isinstance(value, bool) or not (isinstance(value, kind) or (kind is float and isinstance(value, int))):
        return f"{name} takes {TYPE_NAMES[kind]}, got {value!r}"
    if isinstance(value, str):
        choices = BUDGET_CHOICES.get(name, (value,))
        return None if value in choices else f"{name} is {' or '.join(choices)}, got {value!r}"
    if isinstance(value, tuple):
        ok = all(isinstance(v, int) and v >= 1 for v in value)
        return None if ok else f"{name} takes steps >= 1, got {value}"
    ok, want = ((0 <= value < 1, "in [0, 1)") if name in BUDGET_FRACTIONS else
                (value >= 0, ">= 0") if name in BUDGET_MAY_BE_ZERO else
                (value >= 2, ">= 2") if name == "gen_batch" else   # batch norm needs two samples
                (value >= 1, ">= 1") if isinstance(value, int) else (value > 0, "> 0"))
    return None if ok and math.isfinite(value) else f"{name} is {want}, got {value}"


# The paper's budgets where it or its sources give them (README, "Presets"): WGAN-GP's critic schedule
# (Gulrajani et al. 2017), 3000 generator steps per task (kuc2477/pytorch-deep-generative-replay), van de Ven
# et al.'s 784-400-400-10 solver, batch 128, and 2000 (split) or 5000 (permuted) solver steps per task. Three
# deviations, each with its evidence in reference/README.md: the MNIST experiments replay the running average
# of the generator's weights (gen_ema); permuted's GAN is fully connected, since convolutions cannot model
# permuted pixels; chain's and permuted's solver lr decays by a cosine within each task.
SVHN_SAMPLES = (1000, 2000, 5000, 10000, 20000)   # Fig. 4's generator steps
PAPER = {
    "chain": Budget(solver_iters=5000, gen_iters=5000, eval_every=1000, gen_ema=0.99,
                    solver_schedule="cosine"),
    "permuted": Budget(solver_iters=5000, gen_iters=3000, eval_every=500, gen_ema=0.99, gan="mlp", width=256,
                       gen_lr=4e-4, critic_lr=8e-4, solver_schedule="cosine"),
    "split": Budget(solver_iters=2000, gen_iters=3000, eval_every=250, gen_ema=0.99),
    "mnist-svhn": Budget(solver_iters=5000, gen_iters=20000, eval_every=500, sample_at=SVHN_SAMPLES),
    "svhn-mnist": Budget(solver_iters=5000, gen_iters=20000, eval_every=500, sample_at=SVHN_SAMPLES),
    "lwf": Budget(solver_iters=5000, gen_iters=20000, eval_every=500, warmup_iters=1000),
}
# fast: for a CPU; split's and permuted's budgets are points of GR's measured frontier of accuracy against
# time on 2 cores (reference/README.md). A fully connected WGAN-GP (far cheaper per image on a CPU than the
# DCGAN's convolutions) with 3 critic steps at twice the generator's lr (TTUR), and the solver's lr decayed by
# a cosine within each task. chain's and permuted's generators, which must carry all ten digits (of every
# permutation) to the next task, are wider. split's GAN trains on larger batches at a higher lr, for the
# paper's 3000 steps, since what split's GR loses is what its generators fail to carry; its last task's
# generator, which only the sample figure would show, is skipped. split's solver replays 1024 samples per step
# beside its 128 real inputs, permuted's 512: the replay term stands for all past tasks and weighs (i-1)/i on
# task i, and 128 samples of it make a noisy estimate. chain's links after the first learn from 512 replayed
# samples per step, their whole loss. permuted pays for its larger replay with a third fewer generator steps,
# which cost it less than the replay gains. GR+distill distils at T = 1 in split and permuted, where the
# replay term shares the loss with the new task's real inputs and T = 2 learns each new task worse; chain's
# links learn from the old solver's targets alone and keep van de Ven et al.'s T = 2.
FAST_GAN = dict(gan="mlp", width=128, n_critic=3, gen_lr=2e-4, critic_lr=4e-4, solver_schedule="cosine")
FAST_ALL_DIGITS = dict(FAST_GAN, width=256, gen_iters=3000, solver_iters=5000, gen_ema=0.99)
FAST_SVHN = dict(FAST_GAN, solver_iters=1000, gen_iters=2000, eval_every=250)
FAST = {
    "chain": Budget(eval_every=1000, replay_batch=512, **FAST_ALL_DIGITS),
    "permuted": Budget(eval_every=500, gen_batch=128, replay_batch=512, temperature=1.0,
                       **dict(FAST_ALL_DIGITS, gen_iters=2000, gen_lr=4e-4, critic_lr=8e-4)),
    "split": Budget(solver_iters=1000, gen_iters=3000, eval_every=250, solver_lr=3e-4, gen_ema=0.99,
                    gen_batch=256, replay_batch=1024, last_generator="skip", temperature=1.0,
                    **dict(FAST_GAN, gen_lr=8e-4, critic_lr=1.6e-3)),
    "mnist-svhn": Budget(sample_at=(200, 500, 1000, 2000), **FAST_SVHN),
    "svhn-mnist": Budget(sample_at=(200, 500, 1000, 2000), **FAST_SVHN),
    "lwf": Budget(warmup_iters=200, **FAST_SVHN),
}
# quick: a smoke test that runs each experiment on a CPU in about a minute, not a reproduction; its tiny GAN
# needs a high lr to learn anything in so few steps.
QUICK_COMMON = dict(solver_iters=150, gen_iters=60, batch=64, gen_batch=16, eval_every=50, train_limit=3000,
                    test_limit=1000, width=8, hidden=128, cnn_channels=8, n_tasks=3, n_critic=3, gen_lr=1e-3,
                    probe_iters=50)
QUICK = {exp: Budget(**QUICK_COMMON) for exp in ("chain", "permuted")}
QUICK.update({"split": Budget(**{**QUICK_COMMON, "gen_iters": 120, "solver_iters": 200}),
              "mnist-svhn": Budget(**QUICK_COMMON, sample_at=(10, 20, 40, 60)),
              "svhn-mnist": Budget(**QUICK_COMMON, sample_at=(10, 20, 40, 60)),
              "lwf": Budget(**QUICK_COMMON, warmup_iters=30)})
PRESETS = {"paper": PAPER, "fast": FAST, "quick": QUICK}

# ------------------------------------------------------------------------------------------------------------
# Data: a Task holds one task's inputs (pixels in [-1, 1]) and labels as tensors on the training device; the
# experiments' tasks are made from datasets (x_train, y_train, x_test, y_test), loaded by the plumbing.


@dataclass
class Task:
    """One task's data: inputs x (float, in [-1, 1], batch first) and int64 class labels y, on one device."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    head: int = 0                 # solver head used for this task (LwF has one per task)

    def __post_init__(self):
        for part in ("train", "test"):
            x, y, at = getattr(self, "x_" + part), getattr(self, "y_" + part), f"task {self.name!r}: x_{part}"
            if not (torch.is_tensor(x) and torch.is_tensor(y) and x.is_floating_point() and x.dim() >= 2):
                raise ValueError(f"{at} must be a float tensor (batch, ...), and y_{part} a tensor")
            if y.dtype != torch.long or y.dim() != 1 or (len(y) and int(y.min()) < 0):
                raise ValueError(f"task {self.name!r}: y_{part} must be int64 labels >= 0 of shape (batch,), "
                                 f"got {y.dtype}")
            if len(x) != len(y) or x.device != y.device:
                raise ValueError(f"{at} and y_{part} must be as long and on one device, got {len(x)} inputs "
                                 f"on {x.device} and {len(y)} labels on {y.device}")
            lo, hi = (float(v) for v in torch.aminmax(x)) if len(x) else (0.0, 0.0)
            if math.isnan(lo) or math.isnan(hi):
                raise ValueError(f"{at} holds NaN values")
            if not -1.0 <= lo <= hi <= 1.0:
                raise ValueError(f"{at} lies in [{lo:.3g}, {hi:.3g}]; inputs must lie in [-1, 1] (the "
                                 "generator ends in tanh): e.g. pixels / 127.5 - 1")
        if not len(self.x_train):
            raise ValueError(f"task {self.name!r} has no training inputs")
        if self.x_train.shape[1:] != self.x_test.shape[1:] or self.x_train.device != self.x_test.device:
            raise ValueError(f"task {self.name!r}: train and test inputs differ in shape or device")


def make_task(name, data, b: Budget, seed: int, head: int = 0, transform=None, classes=None) -> Task:
    """A task from (x_train, y_train, x_test, y_test): optional class subset and input transform."""
    gen, parts = torch.Generator().manual_seed(seed), []
    for x, y, limit in ((data[0], data[1], b.train_limit), (data[2], data[3], b.test_limit)):
        if classes is not None:
            keep = torch.isin(y, torch.tensor(classes, device=y.device))
            x, y = x[keep], y[keep]
        if limit and limit < len(x):   # a random subset, fixed by the seed
            idx = torch.randperm(len(x), generator=gen)[:limit].to(x.device)
            x, y = x[idx], y[idx]
        parts += [transform(x) if transform else x, y]
    return Task(name, *parts, head=head)


def pixel_permutation(n_pixels: int, seed: int, task: int) -> torch.Tensor:
    """The fixed pixel order of permuted task `task` (task 0 is the identity)."""
    if task == 0:
        return torch.arange(n_pixels)
    return torch.randperm(n_pixels, generator=torch.Generator().manual_seed(10_000 * seed + task))


def permuted_tasks(data, b: Budget, seed: int) -> list[Task]:
    """b.n_tasks tasks of all of `data`, each with its own fixed order of the input's values (pixels)."""
    perms = [pixel_permutation(data[0][0].numel(), seed, t).to(data[0].device) for t in range(b.n_tasks)]
    return [make_task(f"perm{t + 1}", data, b, seed, transform=lambda x, p=p: x.flatten(1)[:, p].view_as(x))
            for t, p in enumerate(perms)]


SPLIT_CLASSES = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def split_tasks(data, b: Budget, seed: int) -> list[Task]:
    return [make_task(f"{c[0]}-{c[1]}", data, b, seed, classes=c) for c in SPLIT_CLASSES]


# ------------------------------------------------------------------------------------------------------------
# Models: DCGAN-style generator, critic without batch norm, MLP or CNN solver with one head per task; the
# scholar, and the Adam optimizers each of its networks trains with.


def check_input_shape(shape) -> tuple:
    """One input's shape as a tuple: (C, H, W) with C >= 1 and H, W >= 8, or (D,) with D >= 1."""
    shape = tuple(shape)
    ok = all(isinstance(d, int) and d >= 1 for d in shape) and (
        len(shape) == 1 or (len(shape) == 3 and min(shape[1:]) >= 8))
    if not ok:
        raise ValueError(f"input shape must be (C, H, W) with H, W >= 8, or (D,), got {shape}")
    return shape


def image_shape(shape, what: str) -> tuple[int, int, int]:
    """(C, H, W) of an input shape, or a ValueError that says what `what` needs."""
    if len(shape) != 3:
        raise ValueError(f"{what} needs images of shape (C, H, W), got {tuple(shape)}; for vectors use "
                         "the fully connected GAN, Budget(gan='mlp')")
    return tuple(shape)


class Generator(nn.Module):
    """DCGAN generator, z -> image in [-1, 1]: a linear layer to a (width * 2^(n-1)) x h0 x w0 map, then
    n transposed convolutions each doubling the size (128x7x7 -> 64x14x14 -> 1x28x28, or 256x4x4 -> ...
    -> 3x32x32 at width 64), n as large as keeps h0, w0 >= 4; a larger output is cropped to H x W."""

    def __init__(self, shape, z_dim=100, width=64):
        super().__init__()
        c, h, w = image_shape(shape, "the conv GAN")
        n_up = max(1, int(math.log2(min(h, w) / 4)))
        self.z_dim, self.shape = z_dim, (c, h, w)
        self.start, ch = (math.ceil(h / 2 ** n_up), math.ceil(w / 2 ** n_up)), width * 2 ** (n_up - 1)
        units = ch * math.prod(self.start)
        self.fc = nn.Sequential(nn.Linear(z_dim, units), nn.BatchNorm1d(units), nn.ReLU())
        layers = []
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1), nn.BatchNorm2d(ch // 2), nn.ReLU()]
            ch //= 2
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(ch, c, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        x = self.net(self.fc(z).view(len(z), -1, *self.start))
        _, h, w = self.shape
        if x.shape[2:] == (h, w):
            return x
        top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
        return x[:, :, top:top + h, left:left + w]


def make_critic(shape, width=64) -> nn.Sequential:
    """DCGAN critic, image -> score: stride-2 convolutions of width, 2 width, 4 width, ... channels
    (64-128-256 for 28x28 and 32x32) until the map is at most 4x4, each halving the size (kernel 4; kernel 3
    on an odd size, rounding up), then a linear layer. No batch norm: it would couple the samples of the
    penalty."""
    c, h, w = image_shape(shape, "the conv GAN")
    layers, ch = [], c
    for i in itertools.count():
        if max(h, w) <= 4:
            break
        odd = h % 2 or w % 2
        layers += [nn.Conv2d(ch, width * 2 ** i, 3 if odd else 4, 2, 1), nn.LeakyReLU(0.2)]
        ch, h, w = width * 2 ** i, (h + 1) // 2 if odd else h // 2, (w + 1) // 2 if odd else w // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(ch * h * w, 1))


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
    """Classifier: an MLP (hidden-hidden, 784-400-400 on MNIST) for vectors and one-channel images, a CNN
    (two 5x5 convolutions of k and 2k channels with 2x2 max pooling, then hidden units) for images of
    several channels (SVHN); then one n_classes-way linear head per task; dropout after each hidden layer."""

    def __init__(self, shape, n_classes=10, n_heads=1, hidden=400, cnn_channels=32, dropout=0.0):
        super().__init__()
        drop = lambda: [nn.Dropout(dropout)] if dropout else []
        if len(shape) == 1 or shape[0] == 1:
            self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), hidden), nn.ReLU(), *drop(),
                                       nn.Linear(hidden, hidden), nn.ReLU(), *drop())
        else:
            (c, h, w), k = shape, cnn_channels
            self.trunk = nn.Sequential(
                nn.Conv2d(c, k, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(k, 2 * k, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(2 * k * (h // 4) * (w // 4), hidden), nn.ReLU(), *drop())
        self.heads = nn.ModuleList(nn.Linear(hidden, n_classes) for _ in range(n_heads))

    def forward(self, x, head: int = 0):
        return self.heads[head](self.trunk(x))


class Scholar(nn.Module):
    """A generator with its critic (WGAN-GP) and a solver: the networks a task learns and later replays.

    shape: one input's shape, (C, H, W) with H, W >= 8 for images or (D,) for vectors (the fully connected
    GAN only); inputs are float tensors in [-1, 1] (the generator ends in tanh). n_classes: the solver's
    classes, labels 0..n_classes-1. The training code holds the optimizers (`optimizers`). With b.gen_ema
    the scholar also keeps a running average of its generator's weights (`generator_ema`), which it
    samples and replays."""

    def __init__(self, shape, b: Budget, n_heads=1, with_generator=True, n_classes=10):
        super().__init__()
        self.shape, self.z_dim, self.n_classes = check_input_shape(shape), b.z_dim, n_classes
        if not (isinstance(n_classes, int) and n_classes >= 2):
            raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
        self.solver = Solver(self.shape, n_classes, n_heads, b.hidden, b.cnn_channels, b.dropout)
        self.generator = self.critic = None
        if with_generator:
            conv = b.gan == "conv"
            self.generator = (Generator if conv else MLPGenerator)(self.shape, b.z_dim, b.width)
            self.critic = (make_critic if conv else make_mlp_critic)(self.shape, b.width)
            if conv:   # channels_last: faster convolutions on CPU (oneDNN) and on GPU tensor cores
                self.generator.to(memory_format=torch.channels_last)
                self.critic.to(memory_format=torch.channels_last)
        self.generator_ema = None
        if b.gen_ema and with_generator:
            self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)

    def optimizers(self, b: Budget, graphs: bool = False) -> dict[str, torch.optim.Optimizer]:
        """Adam for each network: the solver's (0.9, 0.999), the GAN's (0.5, 0.9) as in WGAN-GP; `graphs`:
        capturable by CUDA graphs (train_task's graphs=True)."""
        opts = {"solver": adam(self.solver, b.solver_lr, graphs=graphs)}
        if self.generator is not None:
            opts["generator"] = adam(self.generator, b.gen_lr, (0.5, 0.9), graphs)
            opts["critic"] = adam(self.critic, b.effective_critic_lr, (0.5, 0.9), graphs)
        return opts

    def frozen_copy(self) -> Scholar:
        """The previous scholar: a copy without gradients of the generator it replays (the weight average,
        where kept) and of its solver, to sample and label; no critic."""
        critic, generator, average = self.critic, self.generator, self.generator_ema
        replayed = generator if average is None else average
        self.critic, self.generator, self.generator_ema = None, replayed, None
        try:
            return copy.deepcopy(self).requires_grad_(False)
        finally:
            self.critic, self.generator, self.generator_ema = critic, generator, average

    @torch.no_grad()
    def sample(self, n: int, trained: bool = False) -> torch.Tensor:
        """n samples of the generator this scholar replays (the weight average, where kept), or with
        trained=True of the generator in training (the critic's fakes)."""
        generator = self.generator if trained or self.generator_ema is None else self.generator_ema
        z = torch.randn(max(n, 2), self.z_dim, device=next(generator.parameters()).device)
        return generator(z)[:n]   # train-mode batch norm, as in training: it needs two samples at least

    @torch.no_grad()
    def average_generator(self, decay: float, step: int) -> None:
        """generator_ema <- its running average after generator step `step` (from 1) of a task: the mean of
        the task's weights so far, until the newest's weight 1/step falls to 1 - decay, then an exponential
        average over about 1/(1 - decay) steps. Step 1 restarts it from the generator's weights."""
        weight = max(1.0 / step, 1.0 - decay)
        torch._foreach_lerp_(list(self.generator_ema.parameters()), list(self.generator.parameters()), weight)
        for average, b in zip(self.generator_ema.buffers(), self.generator.buffers()):   # batch norm's stats
            average.copy_(b)

    @torch.no_grad()
    def label(self, x: torch.Tensor, head: int = 0, soft: bool = False, temperature: float = 1.0):
        was_training = self.solver.training
        self.solver.eval()
        logits = self.solver(x, head)
        self.solver.train(was_training)
        return (logits / temperature).softmax(1) if soft else logits.argmax(1)


def adam(module: nn.Module, lr: float, betas=(0.9, 0.999), graphs: bool = False) -> torch.optim.Adam:
    """Adam over a module's parameters. On CUDA the fused kernel with its lr a float32 tensor on the device
    (the dtype that kernel reads), so that a replayed CUDA graph reads the lr of the moment (the cosine
    schedule) and eager steps do the same arithmetic; capturable when steps run as graphs."""
    p = next(module.parameters())
    if not p.is_cuda:
        return torch.optim.Adam(module.parameters(), lr=lr, betas=betas)
    return torch.optim.Adam(module.parameters(), lr=torch.tensor(lr, dtype=torch.float32, device=p.device),
                            betas=betas, capturable=graphs, fused=True)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


# ------------------------------------------------------------------------------------------------------------
# The two losses of a replay step: the plain PyTorch reference (*_ref) beside the fused C++/CUDA op of csrc/
# (torch.ops.dgr.*) that replaces it. One process-wide choice, set_impl (impl= overrides it per call): auto
# (the op where it loads, else the reference), ext (the op, or an error), torch (the reference). OPS["load"]
# is the op loader of the plumbing below.

IMPLS = ("auto", "ext", "torch")
OPS = {"impl": "auto", "loaded": None, "kernels": {}, "load": None}   # loaded: None (not tried), True, False


def set_impl(impl: str) -> None:
    """Choose the loss implementation for this process: auto, ext (the fused op, or an error) or torch."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: choose from {', '.join(IMPLS)}")
    OPS["impl"] = impl


def use_extension(x: torch.Tensor, impl: str | None = None) -> bool:
    """Whether the fused op serves this call: impl allows it, the op is loaded and has a kernel for x's
    device."""
    impl = impl or OPS["impl"]
    if impl == "torch":
        return False
    if OPS["loaded"] is None:
        OPS["load"](required=impl == "ext")
    key = "CUDA" if x.is_cuda else "CPU"
    if OPS["loaded"] and OPS["kernels"][key]:
        return True
    if impl == "ext":
        raise RuntimeError(f"the dgr ops have no {key} kernel here (rebuild: python setup.py build_ext "
                           "--inplace)")
    return False


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
    """r * CE(logits_real, labels) + (1 - r) * CE(logits_replay, targets); targets are class indices (hard) or
    probabilities (soft); an empty batch contributes nothing."""
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


def replay_loss(logits_real, labels, logits_replay, targets_replay, r: float, impl: str | None = None):
    """The solver's replay-mixing loss; fused op: log-softmax, loss and gradient in one pass per row."""
    if use_extension(logits_real, impl):
        return torch.ops.dgr.replay_loss_fwd(logits_real, labels, logits_replay, targets_replay, r)[0]
    return replay_loss_ref(logits_real, labels, logits_replay, targets_replay, r)


# ------------------------------------------------------------------------------------------------------------
# The variants, one row each: where the replayed inputs x' come from, and how they are labelled.


@dataclass(frozen=True)
class Variant:
    name: str                       # in tables and figures
    replay: str                     # x': generator (the old one's samples), stored (real inputs), noise, none
    distill: bool = False           # soft targets at a temperature, loss on z/T scaled by T^2 (Hinton et al.)
    ewc: bool = False               # no replay: online EWC's penalty on moving important weights
    lwf_name: str = ""              # its name in LwF, where none still distils (x' = the current inputs)

    @property
    def generative(self) -> bool:   # the scholar has a generator to train
        return self.replay == "generator"

    def source(self, lwf: bool = False) -> str:
        """Where x' comes from; in LwF (Learning without Forgetting) None distils the current inputs."""
        return "current" if lwf and self.replay == "none" else self.replay

    def replays(self, lwf: bool = False) -> bool:   # a task after the first has an old scholar to replay from
        return self.source(lwf) != "none"

    def past(self, lwf: bool = False) -> str:
        """What a solver step after the first task adds to the task's loss, which sets its cost: the replay
        source, or EWC's penalty ("ewc"); "none" for plain fine-tuning."""
        return "ewc" if self.ewc else self.source(lwf)

    def label(self, lwf: bool = False) -> str:
        return self.lwf_name if lwf else self.name


VARIANTS = {   # the paper's four (GR, ER, Noise, None) and two baselines
    "gr": Variant("GR", "generator", lwf_name="LwF-GR"),
    "gr+distill": Variant("GR+distill", "generator", distill=True),
    "er": Variant("ER", "stored", lwf_name="LwF-ER"),
    "ewc": Variant("EWC", "none", ewc=True),
    "noise": Variant("Noise", "noise", lwf_name="LwF-Noise"),
    "none": Variant("None", "none", lwf_name="LwF"),
}
REPLAY_SOURCES = ("generator", "stored", "noise", "current", "none")


@dataclass
class Replay:
    """What one task replays: x' from `source` (generator, stored, noise, current, none), labelled by the old
    scholar's solver (head `head`); `ewc` holds online EWC's Fisher, anchor and lambda instead."""
    source: str = "none"
    old: Scholar | None = None
    pool: list = field(default_factory=list)    # stored: x_train of each past task
    head: int = 0
    soft: bool = False
    temperature: float = 1.0
    ewc: dict | None = None

    def __post_init__(self):
        if self.source not in REPLAY_SOURCES:
            raise ValueError(f"unknown replay source {self.source!r}: choose from "
                             f"{', '.join(REPLAY_SOURCES)}")
        if self.source != "none" and not isinstance(self.old, Scholar):
            raise ValueError(f"replay from {self.source!r} needs the previous scholar: "
                             f"Replay({self.source!r}, old=scholar.frozen_copy())")
        if self.source == "generator" and self.old.generator is None:
            raise ValueError("replay from 'generator' needs a previous scholar with a generator")
        if self.source == "stored" and not all(torch.is_tensor(x) and len(x) for x in self.pool or [[]]):
            raise ValueError("replay from 'stored' needs pool=[x_train of each past task], non-empty tensors")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"the temperature must be > 0 and finite, got {self.temperature}")

    def inputs(self, n: int, shape, current: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.source == "generator":
            return self.old.sample(n)
        if self.source == "stored":
            return (stored_rows_in_place if self.pool[0].is_cuda else stored_rows_by_task)(self.pool, n)
        if self.source == "noise":
            device = next(self.old.solver.parameters()).device
            return torch.randn(n, *shape, device=device).clamp_(-1, 1)
        return current if self.source == "current" else None


def stored_rows_by_task(pool: list, n: int) -> torch.Tensor:
    """n real past inputs (ER): each row's task drawn uniformly, then a row of that task's inputs; grouped by
    task. The number drawn per task is read on the host, so on CUDA this waits for the device."""
    which = torch.randint(len(pool), (n,))
    return torch.cat([p[torch.randint(len(p), (int((which == k).sum()),), device=p.device)]
                      for k, p in enumerate(pool)])


def stored_rows_in_place(pool: list, n: int) -> torch.Tensor:
    """The distribution of stored_rows_by_task without a host synchronisation, so that a CUDA graph holds it
    (ER's solver step graphed): a row of every task for each of the n places, one of them kept per place. Used
    on CUDA; the CPU keeps the draw by task, with which the committed CPU results were made."""
    which = torch.randint(len(pool), (n,) + (1,) * (pool[0].dim() - 1), device=pool[0].device)
    rows = pool[0][torch.randint(len(pool[0]), (n,), device=pool[0].device)]
    for k, p in enumerate(pool[1:], 1):
        rows = torch.where(which == k, p[torch.randint(len(p), (n,), device=p.device)], rows)
    return rows


def make_replay(v: Variant, lwf: bool, old: Scholar | None, pool: list, head: int, ewc: dict | None,
                soft_targets: bool = False, temperature: float = BUDGET_DEFAULTS["temperature"]) -> Replay:
    """The replay of variant `v` on a task, given the previous scholar `old` (None on the first task); its
    targets soft where the variant distils (at `temperature`) or soft_targets asks (at 1)."""
    if v.ewc:
        return Replay(ewc=ewc)
    if old is None:
        return Replay()
    soft = v.distill or soft_targets
    return Replay(v.source(lwf), old, pool, head, soft, temperature if v.distill else 1.0)


# ------------------------------------------------------------------------------------------------------------
# The experiments, one row each: how a run's tasks are made, and what it trains and keeps.

LINKS = 5   # chain: scholars in the chain
ALL_BUT_EWC = ("gr", "gr+distill", "er", "noise", "none")


def two_domains(first: str, second: str, heads: bool = False):
    """The tasks of a two-domain experiment: all of `first`, then all of `second` (with heads: on head 1)."""
    return lambda data, b, seed: [make_task(first, data[first], b, seed),
                                  make_task(second, data[second], b, seed, head=int(heads))]


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str                      # in figures
    make_tasks: Callable            # (datasets by name, b, seed) -> the tasks in order
    n_tasks: Callable               # b -> how many tasks (chain: links)
    svhn: bool = False              # SVHN and MNIST at 32x32x3, a CNN solver; else MNIST at 28x28x1, an MLP
    lwf: bool = False               # Learning without Forgetting: a head per task, None distils new inputs
    chain: bool = False             # each task a new link that learns only from the previous link's replay
    shows_last_generator: bool = False   # its last task's generator trains too (for its samples), unless
                                         # the budget skips it
    sample_rows: str = ""           # a sample row after each task: grid <variant>_seed<k>_samples_<rows>.png
    variants: tuple = ALL_BUT_EWC   # the variants that apply

    @property
    def shape(self) -> tuple:
        return (3, 32, 32) if self.svhn else (1, 28, 28)

    @property
    def heads(self) -> int:
        return 2 if self.lwf else 1


def chain_tasks(data: dict, b: Budget, seed: int) -> list[Task]:
    return [make_task("mnist", data["mnist"], b, seed)] * LINKS


EXPERIMENTS = {e.name: e for e in (
    Experiment("chain", "Chain of scholars (Table 1)", chain_tasks, lambda b: LINKS, chain=True,
               sample_rows="links"),
    Experiment("permuted", "Permuted MNIST (Fig. 2)",
               lambda data, b, seed: permuted_tasks(data["mnist"], b, seed), lambda b: b.n_tasks,
               variants=(*ALL_BUT_EWC, "ewc")),
    Experiment("mnist-svhn", "MNIST then SVHN (Fig. 3)", two_domains("mnist", "svhn"), lambda b: 2, svhn=True,
               shows_last_generator=True),
    Experiment("svhn-mnist", "SVHN then MNIST (Fig. 3)", two_domains("svhn", "mnist"), lambda b: 2, svhn=True,
               shows_last_generator=True),
    Experiment("lwf", "SVHN then MNIST, a head per task (Fig. 5)", two_domains("svhn", "mnist", heads=True),
               lambda b: 2, svhn=True, lwf=True, variants=("gr", "er", "noise", "none")),
    Experiment("split", "Split MNIST, class-incremental (Fig. 6)",
               lambda data, b, seed: split_tasks(data["mnist"], b, seed), lambda b: len(SPLIT_CLASSES),
               shows_last_generator=True, sample_rows="tasks", variants=(*ALL_BUT_EWC, "ewc")),
)}


def task_trains(e: Experiment, v: Variant, i: int, b: Budget) -> tuple[bool, bool]:
    """(solver, generator): whether task i of a run of `e` with `v` trains its solver, and its generator.
    Without replay, chain links after the first learn nothing; the last task's generator, which no later task
    replays, trains only where its samples are shown and the budget pays for it."""
    solver = not (e.chain and i > 0 and not v.replays(e.lwf))
    last = e.shows_last_generator and b.last_generator == "train"
    return solver, solver and v.generative and (i < e.n_tasks(b) - 1 or last)


# ------------------------------------------------------------------------------------------------------------
# The training steps, and train_task: one task of Deep Generative Replay.


def random_batch(task: Task, n: int):
    idx = torch.randint(len(task.x_train), (n,), device=task.x_train.device)
    return task.x_train[idx], task.y_train[idx]


def critic_step(s: Scholar, opt, x_real: torch.Tensor, lam: float) -> torch.Tensor:
    """One WGAN-GP critic step. Real and fake inputs are scored in one batch, the interpolates apart: the
    penalty's input gradient and its double backward then run over n rows, not the 3n of one batch of
    all three (whose 2n other rows carry zero gradient): the same numbers for less work."""
    n = len(x_real)
    x_fake = s.sample(n, trained=True)
    eps = torch.rand(n, *[1] * (x_real.dim() - 1), device=x_real.device)
    x_hat = (eps * x_real + (1 - eps) * x_fake).requires_grad_(True)
    scores = s.critic(torch.cat([x_real, x_fake]))
    grad, = torch.autograd.grad(s.critic(x_hat).sum(), x_hat, create_graph=True)
    loss = scores[n:].mean() - scores[:n].mean() + gradient_penalty(grad, lam)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def generator_step(s: Scholar, opt, n: int) -> torch.Tensor:
    """One generator step: raise the critic's score of fresh samples."""
    z = torch.randn(n, s.z_dim, device=next(s.generator.parameters()).device)
    s.critic.requires_grad_(False)
    loss = -s.critic(s.generator(z)).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    s.critic.requires_grad_(True)
    return loss.detach()


def generator_inputs(task: Task, replay: Replay, r: float, n: int) -> torch.Tensor:
    """The generator's 'real' batch on task i: share r of real task-i inputs, 1-r of old-generator samples."""
    n_real = round(r * n) if replay.source == "generator" else n
    x_real = random_batch(task, n_real)[0]
    return x_real if n_real == n else torch.cat([x_real, replay.old.sample(n - n_real)])


def solver_step(s: Scholar, opt, task: Task, replay: Replay, r: float, batch: int,
                replay_batch: int = 0) -> torch.Tensor:
    """One solver step on r*CE(S(x), y) + (1-r)*CE(S(x'), S_old(x')): `batch` real inputs x, `replay_batch`
    replayed x' (0: batch)."""
    x, y = random_batch(task, batch if r > 0 else 0)
    x_rep = replay.inputs(replay_batch or batch, s.shape, current=x) if r < 1 else None
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
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def ewc_penalty(solver: Solver, ewc: dict) -> torch.Tensor:
    """lambda/2 * sum_i F_i (theta_i - theta*_i)^2 over the solver's weights."""
    moved = zip(solver.parameters(), ewc["fisher"], ewc["anchor"])
    return 0.5 * ewc["lam"] * sum((f * (p - a) ** 2).sum() for p, f, a in moved)


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


def train_task(s: Scholar, opts: dict, task: Task, replay: Replay, r: float, b: Budget, *,
               train_generator: bool = True, start: int = 0, graphs: bool = False,
               callback=lambda phase, step, losses: None) -> None:
    """Train scholar `s` (its optimizers `opts`, from Scholar.optimizers) on `task` with `replay`.

    With replay, LwF's head warm-up first (b.warmup_iters steps, if any); then b.solver_iters solver steps on
    r*CE(real) + (1-r)*CE(replayed); then, if train_generator, b.gen_iters generator steps, each after
    b.n_critic WGAN-GP critic steps on the r-mix of real inputs and old samples. `start` skips the first steps
    of a resumed task (its position: solver steps, then generator steps). graphs: whole steps as CUDA graphs
    on a CUDA device. callback(phase, step, losses) follows each step, phase 'warm-up', 'solver' or
    'generator', its step counted from 1. NonFiniteLoss if a loss turns NaN or infinite."""
    check_training_inputs(s, opts, task, replay, r, train_generator)
    solver_done, generator_done = steps_in(start, b)
    if start == 0:   # each task starts the solver's Adam afresh
        opts["solver"] = adam(s.solver, b.solver_lr, graphs=graphs)
        if b.warmup_iters and replay.source != "none":
            warm_up_head(s, task, b, callback)
    device = task.x_train.device if graphs and task.x_train.is_cuda else None   # None: eager steps
    solver = graphed(lambda: solver_step(s, opts["solver"], task, replay, r, b.batch, b.replay_batch), device)
    for step in range(solver_done + 1, b.solver_iters + 1):
        if b.solver_schedule == "cosine":
            set_lr(opts["solver"], b.solver_lr * cosine(step, b.solver_iters))
        losses = {"solver": solver()}
        if step % b.eval_every == 0 or step == b.solver_iters:   # a host sync, now and then
            check_losses(losses, f"task {task.name} solver step {step}")
        callback("solver", step, losses)
    if not train_generator or s.generator is None:
        return

    inputs = functools.partial(generator_inputs, task, replay, r, b.gen_batch)
    gan_step = graphed(lambda: gan_iteration(s, opts, b, inputs), device)
    for step in range(generator_done + 1, b.gen_iters + 1):
        if b.gan_schedule == "cosine":
            factor = cosine(step, b.gen_iters)
            set_lr(opts["generator"], b.gen_lr * factor)
            set_lr(opts["critic"], b.effective_critic_lr * factor)
        losses = gan_step()
        if s.generator_ema is not None:
            s.average_generator(b.gen_ema, step)
        if step % generator_check_every(b) == 0 or step == b.gen_iters:
            check_losses(losses, f"task {task.name} generator step {step}")
        callback("generator", step, losses)


def gan_iteration(s: Scholar, opts: dict, b: Budget, inputs: Callable[[], torch.Tensor]) -> dict:
    """b.n_critic critic steps, each on a fresh batch inputs(), then one generator step; the steps under bf16
    autocast if b.gan_precision asks (weights, Adam, the penalty's input gradient and the inputs, old samples
    among them, stay fp32)."""
    device_type = next(s.generator.parameters()).device.type
    for _ in range(b.n_critic):
        real = inputs()
        with gan_autocast(b, device_type):
            critic_loss = critic_step(s, opts["critic"], real, b.lam)
    with gan_autocast(b, device_type):
        return {"critic": critic_loss, "generator": generator_step(s, opts["generator"], b.gen_batch)}


def gan_autocast(b: Budget, device_type: str) -> torch.autocast:
    """The context of the GAN's steps: bf16 autocast if b.gan_precision asks, else one that changes nothing.
    No weight cache: a CUDA graph replays the casts, which then read the weights as they are."""
    return torch.autocast(device_type, torch.bfloat16, b.gan_precision == "bf16", cache_enabled=False)


def steps_in(at: int, b: Budget) -> tuple[int, int]:
    """A task's position `at`, counted in solver steps then generator steps, as (solver steps, generator
    steps)."""
    return min(at, b.solver_iters), max(0, at - b.solver_iters)


def position_of(phase: str, step: int, b: Budget) -> int:
    """The task position after `step` steps of `phase` (solver or generator): steps_in's inverse."""
    return step + (b.solver_iters if phase == "generator" else 0)


class NonFiniteLoss(FloatingPointError):
    """A loss turned NaN or infinite: training stops rather than go on from poisoned weights."""


def check_losses(losses: dict, where: str) -> None:
    for name, value in losses.items():
        if not math.isfinite(float(value)):
            raise NonFiniteLoss(f"non-finite {name} loss ({float(value)}) at {where}")


def generator_check_every(b: Budget) -> int:
    """Generator steps between loss checks and progress lines: as many per task as solver evaluations."""
    return max(1, b.gen_iters // max(1, b.solver_iters // b.eval_every))


def check_training_inputs(s: Scholar, opts: dict, task: Task, replay: Replay, r: float, train_generator):
    """ValueError, before any step, if train_task's inputs do not fit together: what is wrong, with what."""
    if not (isinstance(s, Scholar) and isinstance(task, Task) and isinstance(replay, Replay)):
        raise ValueError("train_task takes a Scholar, its optimizers, a Task and a Replay")
    p, x, old, name = next(s.solver.parameters()), task.x_train, replay.old, f"task {task.name!r}"
    top = max(int(task.y_train.max()), int(task.y_test.max()) if len(task.y_test) else 0)
    needed = ["solver"] + (["generator", "critic"] if train_generator and s.generator is not None else [])
    for wrong, why in (
            (tuple(x.shape[1:]) != s.shape,
             f"{name} has inputs of shape {tuple(x.shape[1:])}, the scholar was made for {s.shape}"),
            (x.device != p.device or x.dtype != p.dtype, f"{name} is {x.dtype} on {x.device}, the scholar "
             f"{p.dtype} on {p.device}: move one (scholar.to(...), tensor.to(...))"),
            (top >= s.n_classes, f"{name} has label {top}, the scholar's solver has {s.n_classes} classes "
                                 f"(0..{s.n_classes - 1}): Scholar(..., n_classes=K)"),
            (not 0 <= task.head < len(s.solver.heads), f"{name} uses head {task.head}, the solver has fewer"),
            (not 0.0 <= r <= 1.0, f"the real-data share r must lie in [0, 1], got {r}"),
            (old is not None and (old.shape, old.n_classes, len(old.solver.heads) > replay.head)
             != (s.shape, s.n_classes, True), "the previous scholar has other inputs, classes or heads"),
            (any(tuple(q.shape[1:]) != s.shape or q.device != p.device for q in replay.pool),
             f"the stored inputs must have the scholar's shape {s.shape} and device {p.device}"),
            (not isinstance(opts, dict) or any(k not in opts for k in needed),
             f"opts must hold the optimizers {', '.join(needed)}: opts = scholar.optimizers(b)")):
        if wrong:
            raise ValueError(why)


def graphed(step, device: torch.device | None):
    """`step()` run as a CUDA graph on `device` (a CUDA device; None: eager): three eager warm-up calls on a
    side stream, then captured once and replayed at every later call, its tensor outputs overwritten by each
    replay (random numbers drawn inside the graph advance as in eager steps). Else `step` itself. A graph
    holds no host synchronisation: losses stay on the device until a callback reads them."""
    if device is None:
        return step
    state = {"calls": 0, "graph": None, "out": None}

    def run():
        if state["graph"] is None and state["calls"] < 3:
            state["calls"] += 1
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                out = step()
            torch.cuda.current_stream(device).wait_stream(side)
            return out
        if state["graph"] is None:
            state["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(state["graph"]):
                state["out"] = step()
        state["graph"].replay()
        return state["out"]
    return run


def cosine(step: int, steps: int) -> float:
    """The lr factor of step `step` (from 1) of `steps`: a half cosine from 1 down towards 0."""
    return 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))


def warm_up_head(s: Scholar, task: Task, b: Budget, callback=lambda phase, step, losses: None) -> None:
    """LwF: train the new task's head alone on real data before fine-tuning everything."""
    head = s.solver.heads[task.head]
    opt = adam(head, b.solver_lr)
    for step in range(1, b.warmup_iters + 1):
        x, y = random_batch(task, b.batch)
        with torch.no_grad():
            features = s.solver.trunk(x)
        loss = F.cross_entropy(head(features), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss = loss.detach()
        if step == b.warmup_iters:
            check_losses({"warm-up": loss}, f"task {task.name} head warm-up")
        callback("warm-up", step, {"warm-up": loss})


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


def fresh_probe(s: Scholar, b: Budget) -> tuple[Solver, torch.optim.Optimizer]:
    """A new solver of the scholar's shape, classes and heads, with its Adam: measure_generator's probe."""
    probe = Solver(s.shape, s.n_classes, len(s.solver.heads), b.hidden, b.cnn_channels, b.dropout)
    probe.to(next(s.solver.parameters()).device)
    return probe, adam(probe, b.solver_lr)


def probe_step(probe: Solver, opt, scholar: Scholar, batch: int, head: int = 0) -> torch.Tensor:
    """One step of a fresh solver on `batch` samples of the scholar's generator, labelled by its solver (as
    a later task replays them); returns the labels."""
    x = scholar.sample(batch)
    y = scholar.label(x, head)
    loss = F.cross_entropy(probe(x, head), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return y


def measure_generator(s: Scholar, seen: list[Task], b: Budget, head: int = 0) -> dict:
    """The generator as a later task will replay it, measured on b.probe_iters batches of its samples:
    class_share, the share (%) of each class among them as the scholar's solver labels them;
    effective_classes, the exponential of that distribution's entropy (k for k equally frequent classes);
    train_on_generated, the mean test accuracy (%) on the tasks seen (on `head`) of a fresh solver trained
    only on those samples and labels. The solver accuracies measure what was learnt; this measures what a
    replay can carry. The random streams are left as they were: measuring changes nothing the run learns."""
    device = next(s.solver.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        scholar = s.frozen_copy()   # sampling moves batch-norm statistics: not those of the run
        probe, opt = fresh_probe(s, b)
        counts = torch.zeros(s.n_classes, dtype=torch.long, device=device)
        for _ in range(b.probe_iters):
            counts += torch.bincount(probe_step(probe, opt, scholar, b.batch, head), minlength=s.n_classes)
        accs = accuracy(probe, [t for t in seen if t.head == head])
    share = counts.double() / counts.sum()
    entropy = -float((share[share > 0] * share[share > 0].log()).sum())
    return {"train_on_generated": sum(accs) / len(accs), "effective_classes": math.exp(entropy),
            "class_share": [round(100 * float(p), 2) for p in share]}


# ------------------------------------------------------------------------------------------------------------
# learn: a run (experiment, variant, seed) learns its tasks one after another; all it has learnt is a Run.

SAMPLES_PER_ROW = 10
RUN_STATE = ("ewc", "curves", "acc_after", "samples", "generators", "stage", "step")   # besides networks


@dataclass
class Run:
    """All a run has learnt and made so far, and where it is: task (or chain link) `stage`, `step` steps into
    it (its position: solver steps, then generator steps). A checkpoint holds its state_dict."""
    scholar: Scholar
    opts: dict                                   # the scholar's optimizers by network
    old: Scholar | None = None                   # the previous scholar, during a task with replay
    ewc: dict | None = None                      # online EWC: Fisher and anchor of the tasks so far
    curves: list = field(default_factory=list)   # evaluations during training
    acc_after: list = field(default_factory=list)   # test accuracies after each stage
    samples: dict = field(default_factory=dict)  # sample rows for the figures: name -> [(stage or step, x)]
    generators: list = field(default_factory=list)   # measure_generator of each trained generator, by task
    stage: int = 0
    step: int = 0

    def state_dict(self) -> dict:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {**{k: getattr(self, k) for k in RUN_STATE},
                "rng": {"cpu": torch.get_rng_state(), "cuda": cuda}, "scholar": self.scholar.state_dict(),
                "opts": {k: o.state_dict() for k, o in self.opts.items()},
                "old": None if self.old is None else self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scholar.load_state_dict(state["scholar"])
        for k, o in self.opts.items():
            live = [g["lr"] for g in o.param_groups]   # on CUDA a float32 tensor on the device (adam)
            o.load_state_dict(state["opts"][k])        # which this would swap for the saved one, on the CPU
            for g, lr in zip(o.param_groups, live):
                g["lr"] = lr.fill_(float(g["lr"])) if torch.is_tensor(lr) else float(g["lr"])
        self.old = None if state["old"] is None else self.scholar.frozen_copy()
        if self.old is not None:
            self.old.load_state_dict(state["old"])
        for k in RUN_STATE:
            setattr(self, k, state[k])
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def replay_share(r: float | None, i: int) -> float:
    """Real-data share on task i (0-based): r if given, else 1/(i+1), so that every task seen weighs the same.
    """
    return 1.0 if i == 0 else (r if r is not None else 1.0 / (i + 1))


def learn(e: Experiment, v: Variant, tasks: list[Task], b: Budget, *, r: float | None = None,
          soft_targets: bool = False, graphs: bool = False, on_step=None,
          state: dict | None = None) -> Run:
    """Learn `tasks` one after another with variant `v` (chain: the same task, a new scholar per link, link k
    > 1 from link k-1's samples and labels only); test accuracy on the tasks after each one. r: the real share
    (default 1/i); soft_targets: the old solver's probabilities as targets; graphs: steps as CUDA graphs.
    `state`: a Run's state_dict to continue from. on_step(run, task, phase, step, info) follows each step
    (info: the losses, and "acc" where the solver was evaluated) and each task's end (phase "end")."""
    x = tasks[0].x_train
    new_scholar = lambda: Scholar(x.shape[1:], b, e.heads, v.generative).to(x.device)
    s = new_scholar()
    run = Run(s, s.optimizers(b, graphs))
    if state is not None:   # resume (random streams included)
        run.load_state_dict(state)
    for i in range(run.stage, len(tasks)):
        task, run.stage = tasks[i], i
        if run.step == 0:   # the task begins: the scholar so far becomes the old one
            run.old = run.scholar.frozen_copy() if i > 0 and v.replays(e.lwf) else None
            if e.chain and i > 0 and b.chain_init == "fresh":   # the link learns from scratch
                run.scholar = new_scholar()
                run.opts = run.scholar.optimizers(b, graphs)
        pool = [t.x_train for t in (tasks[i - 1:i] if e.chain else tasks[:i])]
        replay = make_replay(v, e.lwf, run.old, pool, tasks[i - 1].head if i else 0, run.ewc, soft_targets,
                             b.temperature)
        share = (0.0 if e.chain else replay_share(r, i)) if replay.source != "none" else 1.0
        seen = tasks[:1] if e.chain else tasks[:i + 1]

        def after_step(phase, step, losses, i=i, task=task, seen=seen):
            if phase != "warm-up":
                run.step = position_of(phase, step, b)
            if phase == "solver" and (step % b.eval_every == 0 or step == b.solver_iters):   # Fig. 2's curves
                losses = {**losses, "acc": accuracy(run.scholar.solver, seen)}
                run.curves.append({"task": task.name, "step": i * b.solver_iters + step, "acc": losses["acc"],
                                   "avg": sum(losses["acc"]) / len(seen), "loss": float(losses["solver"])})
            if phase == "generator" and step in b.sample_at:   # Fig. 4: samples during training
                run.samples.setdefault(f"task{i + 1}", []).append((step, run.scholar.sample(SAMPLES_PER_ROW)))
            if on_step:
                on_step(run, task, phase, step, losses)
        trains_solver, trains_generator = task_trains(e, v, i, b)
        if trains_solver:
            train_task(run.scholar, run.opts, task, replay, share, b, train_generator=trains_generator,
                       start=run.step, graphs=graphs, callback=after_step)
        run.acc_after.append(accuracy(run.scholar.solver, tasks[:1] if e.chain else tasks))
        if v.ewc and i < len(tasks) - 1:
            run.ewc = ewc_update(run.ewc, run.scholar.solver, task, b)
        if trains_generator and b.probe_iters:
            run.generators.append({"task": i + 1, **measure_generator(run.scholar, seen, b, task.head)})
        if e.sample_rows and trains_generator:   # Table 1's and Fig. 7's sample rows
            run.samples.setdefault(e.sample_rows, []).append((i + 1, run.scholar.sample(SAMPLES_PER_ROW)))
        run.old, run.stage, run.step = None, i + 1, 0
        if on_step:
            on_step(run, task, "end", 0, {})
    return run


def run_one(e: Experiment, variant: str, seed: int, data: dict, b: Budget, **learning) -> dict:
    """One run (experiment, variant, seed), from scratch or from learning["state"]: a JSON-able result, with
    the sample rows (tensors) under "samples". `learning`: learn's keyword arguments."""
    torch.manual_seed(seed)
    tasks = e.make_tasks(data, b, seed)
    run = learn(e, VARIANTS[variant], tasks, b, **learning)
    names, per_stage = [t.name for t in tasks], run.acc_after
    if e.chain:   # one accuracy per link, on MNIST
        names, per_stage = [f"solver{k + 1}" for k in range(len(tasks))], [[a[0] for a in run.acc_after]]
    final = per_stage[-1]
    return {"tasks": names, "curves": run.curves, "acc_after_task": per_stage,
            "final": {"acc": final, "avg": sum(final) / len(final)}, "generators": run.generators,
            "samples": run.samples}


# ============================================================================================================
# Plumbing: the fused ops' loading, progress and expected time, checkpoints, datasets, running, figures
# and summaries, the command line. The method above uses none of it (the op loader reaches it through
# OPS["load"]).
# ------------------------------------------------------------------------------------------------------------
# The fused ops (csrc/): built by setup.py, or JIT-built on first use; on failure one warning, and the PyTorch
# references serve (stylegan2-ada's custom ops do the same).

EXTENSION_NAME = "dgr_ops"
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def load_extension(required: bool = False) -> bool:
    """Load the ops: the built module dgr_ops if importable, else a JIT build of csrc/ (cached by torch); on
    failure warn once and return False (the PyTorch references serve), or raise if required."""
    import importlib
    import warnings
    try:
        try:
            importlib.import_module(EXTENSION_NAME)
        except ImportError:
            prefer_cuda_toolkit()
            quiet_cpp_extension()
            from torch.utils import cpp_extension
            with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
            cache = cpp_extension._get_build_directory(EXTENSION_NAME, False)
            if not os.path.exists(os.path.join(cache, EXTENSION_NAME + ".so")):
                kernels, minutes = ("CPU and CUDA", "1-3 min") if with_cuda else ("CPU", "40 s")
                print(f"dgr: building the fused ops once ({kernels} kernels, about {minutes}; cached for "
                      "later runs; `python setup.py build_ext --inplace` builds them ahead)", file=sys.stderr,
                      flush=True)
            cpp_extension.load(EXTENSION_NAME, extension_sources(with_cuda), extra_cflags=["-O3"],
                               extra_cuda_cflags=["-O3"], is_python_module=False)
        register_op_python_parts()
        OPS["kernels"] = {key: torch._C._dispatch_has_kernel_for_dispatch_key("dgr::gradient_penalty", key)
                          for key in ("CPU", "CUDA")}
        OPS["loaded"] = True
    except Exception as e:  # compiler missing, build error, ABI mismatch
        lines = str(e).strip().splitlines() or [""]
        first = next((ln for ln in lines if " error:" in ln), None) or next(
            (ln for ln in lines if "rror" in ln), lines[-1])
        reason = f"{type(e).__name__}: {first.strip()[:300]}"
        OPS["loaded"] = False
        if required:
            raise RuntimeError(f"the dgr extension could not be loaded or built ({reason})") from None
        warnings.warn(f"dgr: fused ops unavailable ({reason}); using the PyTorch reference implementations "
                      "(dgr.set_impl('torch') or --impl torch chooses them without this warning)",
                      RuntimeWarning, stacklevel=4)
    return OPS["loaded"]


OPS["load"] = load_extension


def prefer_cuda_toolkit() -> None:
    """torch guesses CUDA_HOME from nvcc on PATH, which can point at /usr/local; prefer /usr/local/cuda."""
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def quiet_cpp_extension() -> None:
    """torch.utils.cpp_extension logs 'No CUDA runtime is found' on every import where a toolkit is installed
    without a GPU, which is the normal case on a CPU machine with CUDA tools: not a warning here."""
    import logging
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def extension_sources(with_cuda: bool) -> list[str]:
    cuda = [os.path.join(CSRC, "cuda", "dgr_ops.cu")] if with_cuda else []
    return [os.path.join(CSRC, "dgr_ops.cpp")] + cuda


def register_op_python_parts() -> None:
    """Autograd formulas and fake (meta) kernels of the ops, so they train and trace under torch.compile."""
    if OPS.get("registered"):
        return
    lib = torch.library
    lib.register_fake("dgr::gradient_penalty")(lambda grad, lam: grad.new_empty(()))
    lib.register_fake("dgr::gradient_penalty_backward")(lambda grad_out, grad, lam: torch.empty_like(grad))
    lib.register_fake("dgr::replay_loss_fwd")(lambda real, labels, replay, targets, r: (
        real.new_empty(()), torch.empty_like(real), torch.empty_like(replay)))

    def gp_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.lam = inputs[1]

    def gp_backward(ctx, grad_out):
        return torch.ops.dgr.gradient_penalty_backward(grad_out, ctx.saved_tensors[0], ctx.lam), None

    def rl_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1], output[2])     # d loss / d logits, made in the forward pass
        ctx.mark_non_differentiable(output[1], output[2])

    def rl_backward(ctx, grad_loss, _grad_d_real, _grad_d_replay):
        d_real, d_replay = ctx.saved_tensors
        return grad_loss * d_real, None, grad_loss * d_replay, None, None
    lib.register_autograd("dgr::gradient_penalty", gp_backward, setup_context=gp_setup)
    lib.register_autograd("dgr::replay_loss_fwd", rl_backward, setup_context=rl_setup)
    OPS["registered"] = True


# ------------------------------------------------------------------------------------------------------------
# Progress and expected time: the steps of a run by kind (from task_trains, as learn trains them), their cost
# timed on this machine, progress lines with an ETA.

STEP_KINDS = ("solver", "replay solver", "generator", "replay generator", "probe")   # that cost differently


def run_plan(e: Experiment, v: Variant, b: Budget) -> list[dict[str, int]]:
    """Steps by kind of each task of a run, without running it; LwF's head warm-up counts as solver steps."""
    plans = []
    for i in range(e.n_tasks(b)):
        solver, generator = task_trains(e, v, i, b)
        replay = "replay " if i > 0 and v.past(e.lwf) != "none" else ""   # EWC's penalty counts as replay
        plan = {replay + "solver": b.solver_iters} if solver else {}
        if solver and replay and b.warmup_iters and v.replays(e.lwf):   # LwF's warm-up: a head for replay
            plan["solver"] = b.warmup_iters
        if generator:
            plan[replay + "generator"] = b.gen_iters
        if generator and b.probe_iters:
            plan["probe"] = b.probe_iters
        plans.append(plan)
    return plans


def add_plans(plans) -> dict[str, int]:
    return dict(sum((collections.Counter(plan) for plan in plans), collections.Counter()))


def steps_done(plans: list[dict[str, int]], stage: int, step: int, b: Budget) -> dict[str, int]:
    """Steps by kind that a run resumed at task `stage`, position `step` in it, has done (an LwF head warm-up
    is over once the position is past 0; a generator's measurement once the task is over)."""
    done = collections.Counter(add_plans(plans[:stage]))
    plan = plans[stage] if step and stage < len(plans) else {}
    solver, generator = steps_in(step, b)
    for kind, n in plan.items():
        if kind == "probe":
            continue
        warm_up = kind == "solver" and "replay solver" in plan
        done[kind] += n if warm_up else generator if "generator" in kind else solver
    return dict(done)


def run_seconds(e: Experiment, variant: str, b: Budget, costs: dict[str, float], at=(0, 0)) -> float:
    """Expected seconds of one run from the step costs; from task at[0], position at[1] in it, if resumed."""
    plans = run_plan(e, VARIANTS[variant], b)
    left = collections.Counter(add_plans(plans))
    left.subtract(steps_done(plans, *at, b))
    costs = costs_of(costs, e, variant)
    return sum(n * costs[kind] for kind, n in left.items() if n > 0)


def costs_of(costs: dict[str, float], e: Experiment, variant: str) -> dict[str, float]:
    """The step costs of one variant's runs: its "replay solver" is the step timed with its own replay source
    (a generator's samples, stored rows, noise and the current inputs each cost differently) or with EWC's
    penalty."""
    own = costs.get(f"replay solver ({VARIANTS[variant].past(e.lwf)})")
    return costs if own is None else {**costs, "replay solver": own}


def step_costs(e: Experiment, b: Budget, device, sources=("generator",), graphs: bool = False, reps: int = 2):
    """Seconds per step of each kind (STEP_KINDS, with "replay solver (<source>)" for each replay source or
    "ewc" in `sources` in place of "replay solver": costs_of picks a variant's), timed on random inputs after
    warm-up, each step run as train_task runs it (with graphs on CUDA a replayed graph, far cheaper than the
    eager step; stored rows drawn from half the experiment's tasks, the mean number of past tasks); the random
    streams of the caller are left as they were."""
    generative = "generator" in sources
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        s = Scholar(e.shape, b, e.heads, with_generator=generative).to(device)
        opts = s.optimizers(b, graphs)
        x, y = torch.rand(256, *e.shape, device=device) * 2 - 1, torch.randint(10, (256,), device=device)
        task = Task("calibration", x, y, x, y)
        old = s.frozen_copy()
        ewc = {"fisher": [torch.ones_like(p) for p in s.solver.parameters()],
               "anchor": [p.detach().clone() for p in s.solver.parameters()], "lam": b.ewc_lambda}
        pool = [x] * (1 if e.chain else max(1, e.n_tasks(b) // 2))   # a chain link stores only its own
        replays = {source: Replay(ewc=ewc) if source == "ewc" else Replay(source, old, pool=pool)
                   for source in sources}
        steps = {"solver": lambda: solver_step(s, opts["solver"], task, Replay(), 1.0, b.batch)}
        for source, replay in replays.items():
            steps[f"replay solver ({source})"] = functools.partial(
                solver_step, s, opts["solver"], task, replay, 0.5, b.batch, b.replay_batch)

        def generator_iteration(rep):
            gan_iteration(s, opts, b, lambda: generator_inputs(task, rep, 0.5, b.gen_batch))
            if s.generator_ema is not None:
                s.average_generator(b.gen_ema, 2)
        if generative:
            probe, probe_opt = fresh_probe(s, b)
            steps.update({"generator": lambda: generator_iteration(Replay()),
                          "replay generator": lambda: generator_iteration(replays["generator"]),
                          "probe": lambda: probe_step(probe, probe_opt, s, b.batch)})
        graphed_on = device if graphs and device.type == "cuda" else None
        costs, warm_ups = {}, 4 if graphed_on else 1   # graphed: 3 eager calls, then the capture and a replay
        for kind, step in steps.items():
            step = step if kind == "probe" else graphed(step, graphed_on)   # measure_generator's: eager
            for _ in range(warm_ups):
                step()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            sync(device)
            costs[kind] = (time.perf_counter() - t0) / reps
    return costs


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def makespan(seconds: list[float], jobs: int) -> float:
    """Wall time of runs taking `seconds` when each, longest first, goes to the first of `jobs` processes
    free."""
    free_at = [0.0] * jobs
    for s in sorted(seconds, reverse=True):
        free_at[free_at.index(min(free_at))] += s
    return max(free_at)


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Progress lines with rate and ETA. The ETA adds up, for each kind of step (STEP_KINDS; a generator step
    counts with its critic steps), the steps left times the seconds per step measured so far; a kind not yet
    seen uses its timed cost (step_costs), scaled by how far the kinds already measured strayed from theirs.
    So a GR run, whose generator steps cost far more than its solver steps, gets a right ETA from its first
    generator progress line. The first step of each kind is left out of its time: it carries what happens
    once (the run's setup, the fused ops' first build, a CUDA graph's capture)."""

    def __init__(self, label: str, plan: dict[str, int], cost: dict | None = None, clock=time.monotonic):
        self.label, self.clock, self.plan, self.cost = label, clock, collections.Counter(plan), cost or {}
        self.done, self.timed = collections.Counter(), collections.Counter()
        self.seconds = collections.defaultdict(float)
        self.last = self.mark = clock()
        self.mark_done = 0

    def skip(self, counts: dict[str, int]) -> None:
        """Steps finished before a resume: out of the plan, without a time."""
        self.plan.subtract(counts)

    def advance(self, kind: str, n: int = 1) -> None:
        now = self.clock()
        if self.done[kind]:
            self.seconds[kind] += now - self.last
            self.timed[kind] += n
        self.done[kind] += n
        self.last = now

    def eta(self) -> float:
        seen = [k for k in self.timed if self.timed[k]]
        expected = sum(self.timed[k] * self.cost.get(k, 0.0) for k in seen)
        scale = sum(self.seconds[k] for k in seen) / expected if expected > 0 else 1.0
        per_step = {k: self.seconds[k] / self.timed[k] if self.timed[k] else self.cost.get(k, 0.0) * scale
                    for k in self.plan}
        return sum(max(0, total - self.done[k]) * per_step[k] for k, total in self.plan.items())

    def line(self, text: str) -> None:
        now, done = self.clock(), sum(self.done.values())
        rate = (done - self.mark_done) / max(1e-9, now - self.mark)
        self.mark, self.mark_done = now, done
        print(f"{self.label} | {text} | {rate:.1f} it/s | ETA {fmt_seconds(self.eta())}", flush=True)


# ------------------------------------------------------------------------------------------------------------
# Checkpoints: one dict, {fingerprint, elapsed, run: Run.state_dict()}, saved in one place (Checkpoint.save)
# and loaded with weights_only=True (tensors, numbers, strings and containers of them: nothing runs), then
# checked against the run before it is trusted. Every file is written by `replacing` (temp file + rename).


class RunStopped(Exception):
    """A run cannot go on (exit 3): its message names the last checkpoint to resume from."""


class Diverged(RunStopped):
    """Non-finite weights at a checkpoint: the run stops rather than replace a good checkpoint."""


class WriteFailed(RunStopped):
    """A file could not be written (a full disk, a read-only or lost mount): the earlier file is kept."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM (exit 128 + the signal's number); the message says what was saved. Not an Exception,
    as KeyboardInterrupt is not: the handlers that turn a failure into a fallback or a one-line error (a
    failed build of the ops, an unreadable checkpoint or dataset) must not swallow a stop."""

    def __init__(self, signum: int, saved: str = ""):
        super().__init__(saved)
        self.signum, self.saved = signum, saved


class StopRequest:
    """The handler of SIGINT and SIGTERM. During a run the first one asks the run to stop after its step
    in progress, with a checkpoint (watch); a second one, or one outside a run, stops at once."""

    def __init__(self):
        self.signum, self.in_run = 0, False

    def __call__(self, signum, frame):
        if self.in_run and not self.signum:
            self.signum = signum
            print("dgr.py: stopping after this step, with a checkpoint (again to stop at once)",
                  file=sys.stderr, flush=True)
        else:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def installed(self):
        """This handler for SIGINT and SIGTERM (in the main thread only), the earlier ones restored after."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        earlier = {signum: signal.signal(signum, self) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for signum, handler in earlier.items():
                signal.signal(signum, handler)

    @contextlib.contextmanager
    def during_run(self):
        self.in_run = True
        try:
            yield
        finally:
            self.in_run = False


def first_non_finite(obj, name: str = "") -> str | None:
    """The name of the first floating tensor in a (nested) dict/list that holds a NaN or inf, else None."""
    if isinstance(obj, torch.Tensor):
        return name if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    named = ((f"{name}.{key}" if name else str(key), value) for key, value in items)
    return next((bad for key, value in named if (bad := first_non_finite(value, key))), None)


def position(stage: int, step: int, b: Budget, n_tasks: int = 0) -> str:
    """'task 2, generator step 40': where a run is, in words (step counts solver, then generator steps)."""
    if n_tasks and stage >= n_tasks:
        return "the end of the last task"
    phase, k = ("solver", step) if step <= b.solver_iters else ("generator", step - b.solver_iters)
    return f"task {stage + 1}, {phase} step {k}" if step else f"the start of task {stage + 1}"


class Checkpoint:
    """A run's checkpoint file, written atomically at every task end and every `every` solver or generator
    steps. `fits(state)` says why a loaded state does not fit the run (its layout, its position), or None."""

    def __init__(self, path: str, every: int = 0, fingerprint: dict | None = None, fits=lambda state: None):
        self.path, self.every, self.fingerprint, self.fits = path, every, fingerprint or {}, fits
        self.started, self.earlier = time.time(), 0.0
        self.at = (0, 0)   # where the saved run stands, (stage, step), once loaded

    def save(self, run: Run, b: Budget) -> None:
        state = run.state_dict()
        bad = first_non_finite(state)   # one host sync per save; a poisoned state never replaces a good one
        if bad:
            raise Diverged(f"non-finite values in {bad} at {position(run.stage, run.step, b)}, not saved")
        with replacing(self.path) as tmp:
            torch.save({"fingerprint": self.fingerprint, "elapsed": self.elapsed(), "run": state}, tmp)

    def elapsed(self) -> float:
        """Seconds this run has trained, earlier sessions (before a resume) included."""
        return self.earlier + time.time() - self.started

    def load(self) -> dict | None:
        """The saved run state, None if there is none; ValueError if unreadable, from another run, or not
        fitting this run."""
        if not os.path.exists(self.path):
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            fingerprint, state, elapsed = saved["fingerprint"], saved["run"], float(saved["elapsed"])
        except Exception as e:
            raise ValueError(f"checkpoint {self.path} is unreadable ({type(e).__name__})") from None
        if (why := run_mismatch(fingerprint, self.fingerprint)):
            raise ValueError(f"checkpoint {self.path} {why}")
        if (why := self.fits(state)):
            raise ValueError(f"checkpoint {self.path} is unreadable ({why})")
        self.earlier, self.at = elapsed, (state["stage"], state["step"])
        return state


def state_problem(state, e: Experiment, variant: str, b: Budget) -> str | None:
    """Why a checkpoint's run state does not fit the run (e, variant, b): its position out of range, or its
    layout (keys, shapes) not that of the run's networks and optimizers, else None."""
    n_tasks = e.n_tasks(b)
    if not isinstance(state, dict):
        return "its state is not a dict"
    stage, step = state.get("stage"), state.get("step")
    if not (type(stage) is int and type(step) is int and 0 <= stage <= n_tasks
            and 0 <= step <= b.solver_iters + b.gen_iters and not (stage == n_tasks and step)):
        return f"its position, task {stage!r} step {step!r}, lies outside this run's {n_tasks} tasks"
    with torch.random.fork_rng():
        s = Scholar(e.shape, b, e.heads, VARIANTS[variant].generative)
        try:
            Run(s, s.optimizers(b)).load_state_dict(state)
        except Exception as err:
            reason = (str(err).splitlines() or [""])[0][:160]
            return f"its contents do not fit this run: {type(err).__name__}: {reason}"
    return None


def run_mismatch(saved, fingerprint: dict) -> str | None:
    """Why a saved result or checkpoint is not this run's (another version of dgr.py, or other settings that
    bear on its numbers), or None if it is."""
    if not isinstance(saved, dict):
        return "is not a result of dgr.py"
    saved, fingerprint = run_settings(saved), run_settings(fingerprint)
    if saved == fingerprint:
        return None
    if set(saved) != set(fingerprint):
        missing, extra = sorted(set(fingerprint) - set(saved)), sorted(set(saved) - set(fingerprint))
        parts = (missing and "lack " + ", ".join(missing), extra and "have " + ", ".join(extra))
        return f"was written by another version of dgr.py (its settings {'; '.join(p for p in parts if p)})"
    differ = ", ".join(f"{k} {saved[k]!r} != {fingerprint[k]!r}" for k in sorted(saved)
                       if saved[k] != fingerprint[k])
    return f"belongs to another run (differs in: {differ})"


GAN_FIELDS = ("gan", "width", "n_critic", "lam", "gen_lr", "critic_lr", "gen_iters", "gen_batch", "gen_ema",
              "gan_schedule", "z_dim", "sample_at", "probe_iters", "last_generator",
              "gan_precision")   # unused without one
# Budget fields added after runs were saved, each with the value that does what dgr.py did before it: a saved
# run without the field is the same run at that value. A new field joins only if such a value exists.
ADDED_BUDGET_FIELDS = {"replay_batch": 0, "last_generator": "train", "gan_precision": "fp32",
                       "temperature": 2.0}


def run_settings(fingerprint):
    """The settings of a fingerprint that bear on its run's numbers: fields added since it was saved at their
    old values, and without the fields its variant does not use (a GAN's for ER)."""
    if not isinstance(fingerprint, dict) or fingerprint.get("variant") not in VARIANTS \
            or fingerprint.get("exp") not in EXPERIMENTS:
        return fingerprint
    v, lwf = VARIANTS[fingerprint["variant"]], EXPERIMENTS[fingerprint["exp"]].lwf
    unused = set() if v.generative else set(GAN_FIELDS)
    unused |= set() if v.distill else {"temperature"}
    unused |= set() if v.ewc else {"ewc_lambda", "fisher_samples"}
    unused |= set() if v.replays(lwf) else {"r", "replay_targets", "replay_batch"}
    return {k: value for k, value in {**ADDED_BUDGET_FIELDS, **fingerprint}.items() if k not in unused}


def run_fingerprint(exp: str, variant: str, seed: int, args: Args, b: Budget, runs_on: dict) -> dict:
    """What makes two runs the same run, everything that changes its numbers: a checkpoint or result resumes
    only under the same fingerprint. runs_on: the device type, the loss implementation and CUDA graphs."""
    settings = {"exp": exp, "variant": variant, "seed": seed, "preset": args.preset, "r": args.r,
                "replay_targets": args.replay_targets}
    return json.loads(json.dumps({**settings, **runs_on, **dataclasses.asdict(b)}))   # as JSON has it


def temp_name(path: str) -> str:
    """A temp file beside `path`, one per process and host: processes and jobs may share a folder."""
    return f"{path}.{socket.gethostname()}-{os.getpid()}.tmp"


@contextlib.contextmanager
def replacing(path: str):
    """Yields a temp path to write; renamed over `path` once written, so no reader sees half a file. A failed
    write, whatever raised it (torch.save and matplotlib raise their own errors for a full disk), removes the
    temp file, leaves `path` as it was, and raises WriteFailed naming the file."""
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [""])[-1][:200]
        raise WriteFailed(f"writing {path} failed ({type(e).__name__}: {reason})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def remove_stale_temp_files(folder: str, stems: list[str]) -> None:
    """Temp files that a killed process left: those of the runs this process holds (`stems`), and this
    host's of the folder's figures and summary whose process is gone."""
    host = socket.gethostname()
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if not name.endswith(".tmp"):
            continue
        owner = name[:-4].rsplit(".", 1)[-1]
        mine = any(name.startswith(os.path.basename(stem) + ".") for stem in stems)
        gone = owner.startswith(host + "-") and not process_alive(owner[len(host) + 1:])
        if mine or gone:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def process_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def write_text(path: str, text: str) -> None:
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


class RunLock:
    """One writer per run: an OS lock on `<stem>.lock` (flock), held while the run trains and released by the
    OS if the process dies, so a killed run never leaves a stale lock. The file names its holder."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def acquire(self) -> str | None:
        """Take the lock: None, or who holds it."""
        import fcntl
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                return holder or "another process"
            try:   # the holder may have removed the file between our open and our lock: lock the new one
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return None

    def holder(self) -> str | None:
        """Who holds the lock now, or None; takes nothing and makes no file."""
        import fcntl
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except OSError:
            return os.read(fd, 200).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            os.close(self.fd)
            self.fd = None


@dataclass
class PlannedRun:
    """A run to do: where its results go (`stem` + .json, .ckpt, .lock, _samples_*.png) and its checkpoint."""
    exp: str
    variant: str
    seed: int
    stem: str
    checkpoint: Checkpoint
    lock: RunLock | None = None

    @property
    def label(self) -> str:
        return f"{self.exp} {VARIANTS[self.variant].label(EXPERIMENTS[self.exp].lwf)} seed {self.seed}"


@dataclass
class ExperimentPlan:
    """An experiment's budget, its folder in --out, and its runs to do."""
    b: Budget
    folder: str
    runs: list[PlannedRun]


# ------------------------------------------------------------------------------------------------------------
# Datasets: torchvision's MNIST and SVHN from --data-dir, checked, downloaded where missing and possible,
# held as tensors on the training device with pixels in [-1, 1]; the experiments make their tasks of them.


class DataError(Exception):
    """A dataset missing and not downloadable, or a dataset file that is damaged: what and where."""


# MNIST's raw files (as torchvision keeps them), each with its idx magic number and its number of items
MNIST_FILES = {"train-images-idx3-ubyte": (2051, 60000), "train-labels-idx1-ubyte": (2049, 60000),
               "t10k-images-idx3-ubyte": (2051, 10000), "t10k-labels-idx1-ubyte": (2049, 10000)}
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def open_dataset(cls, root: str, paths: list[str], folder: str, **kwargs):
    """A torchvision dataset from `root`. Its files (`paths`) present: loaded, else a DataError saying that
    they are damaged; missing: downloaded, else a DataError naming them (`folder`, the dataset's own, removed
    if the failed download left it new and empty)."""
    if all(os.path.exists(p) for p in paths):
        try:
            return cls(root, download=False, **kwargs)
        except Exception as e:   # torchvision's checksum, a truncated or foreign file
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            raise DataError(f"{cls.__name__}'s {', '.join(paths)} cannot be read ({type(e).__name__}: "
                            f"{reason}): damaged or incomplete; delete it to download it again") from None
    existed = os.path.exists(folder)
    try:
        return cls(root, download=True, **kwargs)
    except BaseException as e:  # no network, server down, corrupt download; or a stop (re-raised as it is)
        if not existed and not any(files for _, _, files in os.walk(folder)):
            import shutil
            shutil.rmtree(folder, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        where, files = os.path.abspath(os.path.dirname(paths[0])), ", ".join(map(os.path.abspath, paths))
        raise DataError(f"{cls.__name__} is not in {where} and could not be downloaded ({type(e).__name__}). "
                        f"Expected files: {files}. Set --data-dir or DGR_DATA.") from None


def mnist_paths(data_dir: str) -> list[str]:
    return [os.path.join(data_dir, "MNIST", "raw", f) for f in MNIST_FILES]


def svhn_paths(data_dir: str) -> list[str]:
    return [os.path.join(data_dir, "SVHN", f) for f in SVHN_FILES.values()]


def mnist_files_problem(paths: list[str]) -> str | None:
    """Why MNIST's raw files at `paths` (mnist_paths, all present) are not what they should be: the first
    whose idx header or size is wrong, or None."""
    for path, (magic, n) in zip(paths, MNIST_FILES.values()):
        with open(path, "rb") as f:
            head = f.read(8)
        size, want = os.path.getsize(path), (16 + 784 * n if magic == 2051 else 8 + n)
        got = (int.from_bytes(head[:4], "big"), int.from_bytes(head[4:8], "big")) if len(head) == 8 else None
        if got != (magic, n) or size != want:
            return (f"{path} is not MNIST's {os.path.basename(path)} (header {got}, {size} bytes; expected "
                    f"{(magic, n)}, {want} bytes): delete it to download it again")
    return None


def load_mnist(data_dir: str, device, rgb32: bool = False):
    """MNIST as (x_train, y_train, x_test, y_test); 28x28x1, or 32x32x3 (padded, channel repeated)."""
    from torchvision.datasets import MNIST
    paths = mnist_paths(data_dir)
    if all(os.path.exists(p) for p in paths) and (why := mnist_files_problem(paths)):
        raise DataError(why)
    out = []
    for train in (True, False):
        ds = open_dataset(MNIST, data_dir, paths, os.path.join(data_dir, "MNIST"), train=train)
        x = ds.data.to(device).float().div_(127.5).sub_(1.0).unsqueeze(1)
        out += [F.pad(x, (2, 2, 2, 2), value=-1.0).repeat(1, 3, 1, 1) if rgb32 else x, ds.targets.to(device)]
    return tuple(out)


def load_svhn(data_dir: str, device):
    """SVHN (cropped digits) as (x_train, y_train, x_test, y_test), 32x32x3, labels 0..9."""
    from torchvision.datasets import SVHN
    root, out = os.path.join(data_dir, "SVHN"), []
    for split, path in zip(SVHN_FILES, svhn_paths(data_dir)):
        ds = open_dataset(SVHN, root, [path], root, split=split)
        out += [torch.from_numpy(ds.data).to(device).float().div_(127.5).sub_(1.0),
                torch.from_numpy(ds.labels).long().to(device)]
    return tuple(out)


def load_data(e: Experiment, data_dir: str, device) -> dict:
    """The datasets an experiment's tasks are made from, loaded once for all its runs."""
    if not e.svhn:
        return {"mnist": load_mnist(data_dir, device)}
    return {"mnist": load_mnist(data_dir, device, rgb32=True), "svhn": load_svhn(data_dir, device)}


# ------------------------------------------------------------------------------------------------------------
# Running an experiment's runs: progress, checkpoints and the stop request around run_one; a JSON per run.


def watch(label: str, plans: list[dict], costs: dict, b: Budget, checkpoint: Checkpoint, stop: StopRequest):
    """The on_step of a run: progress lines with ETA, checkpoints, and the stop that a first Ctrl-C or
    SIGTERM asks for, after the step in progress and its checkpoint."""
    progress = Progress(label, add_plans(plans), costs)
    progress.skip(steps_done(plans, *checkpoint.at, b))
    log_every = generator_check_every(b)

    def on_step(run: Run, task: Task, phase: str, step: int, info: dict) -> None:
        if phase == "end":
            if run.generators and run.generators[-1]["task"] == run.stage:
                m = run.generators[-1]
                progress.advance("probe", b.probe_iters)
                progress.line(f"task {task.name} generator measured: a solver trained on its samples "
                              f"{m['train_on_generated']:.2f} %, {m['effective_classes']:.2f} classes")
            return checkpoint.save(run, b)
        replays = "replay " if "replay solver" in plans[run.stage] else ""
        progress.advance("solver" if phase == "warm-up" else replays + phase)
        if phase == "warm-up" and step == b.warmup_iters:
            progress.line(f"task {task.name} head warm-up {step} steps loss {float(info['warm-up']):.3f}")
        if "acc" in info:
            accs, avg = " ".join(f"{a:.1f}" for a in info["acc"]), sum(info["acc"]) / len(info["acc"])
            loss = float(info["solver"])
            progress.line(f"task {task.name} solver {step}/{b.solver_iters} loss {loss:.3f} | acc {accs} | "
                          f"avg {avg:.2f}")
        if phase == "generator" and (step % log_every == 0 or step == b.gen_iters):
            progress.line(f"task {task.name} generator {step}/{b.gen_iters} critic "
                          f"{float(info['critic']):.3f} generator {float(info['generator']):.3f}")
        if phase != "warm-up" and (stop.signum or checkpoint.every and step % checkpoint.every == 0):
            checkpoint.save(run, b)
        if phase != "warm-up" and stop.signum:
            where = position(run.stage, run.step, b)
            raise Interrupted(stop.signum, f"saved at {where} to {checkpoint.path}")
    return on_step


def run_experiment(e: Experiment, args: Args, device, plan: ExperimentPlan, costs: dict, stop: StopRequest,
                   graphs: bool = False, summarize: bool = True) -> str:
    """All planned runs of one experiment: JSON per run, figures and summary.md in <out>/<exp>."""
    b = plan.b
    data = load_data(e, args.data_dir, device) if plan.runs else {}
    learning = dict(r=args.r, soft_targets=args.replay_targets == "soft", graphs=graphs)
    for run in plan.runs:
        checkpoint, label, steps = run.checkpoint, run.label, run_plan(e, VARIANTS[run.variant], b)
        checkpoint.started = time.time()
        try:
            state = checkpoint.load()
            if state is not None:
                where = position(state["stage"], state["step"], b, len(steps))
                print(f"resuming from {checkpoint.path} at {where}", flush=True)
            on_step = watch(label, steps, costs_of(costs, e, run.variant), b, checkpoint, stop)
            with stop.during_run():
                result = run_one(e, run.variant, run.seed, data, b, on_step=on_step, state=state, **learning)
            samples = result.pop("samples")
            result.update(exp=e.name, variant=run.variant, name=VARIANTS[run.variant].label(e.lwf),
                          seed=run.seed, wall_time_s=round(checkpoint.elapsed(), 2),
                          machine=machine_name(device),
                          provenance=provenance(device), fingerprint=checkpoint.fingerprint,
                          config={"args": dataclasses.asdict(args), "budget": dataclasses.asdict(b)})
            write_json(run.stem + ".json", result)
            for key, rows in samples.items():
                save_sample_rows(*sample_figure(label, key, rows, result["generators"]),
                                 f"{run.stem}_samples_{key}.png")
        except Interrupted as err:
            raise Interrupted(err.signum, f"{label} {err.saved or last_checkpoint(checkpoint)}") from None
        except (RunStopped, NonFiniteLoss, RuntimeError) as err:
            if isinstance(err, RuntimeError) and not (args.detect_anomaly and "nan" in str(err).lower()):
                raise
            anomaly = isinstance(err, RuntimeError)
            text = f"anomaly detection: {str(err).splitlines()[0]}" if anomaly else str(err)
            find = "" if args.detect_anomaly else "; --detect-anomaly finds the operation"
            hint = ("free space or choose another --out, then --resume" if isinstance(err, WriteFailed) else
                    "--resume retries from it with the same settings; other settings need --overwrite or "
                    "another --out" + find)
            raise RunStopped(f"{label}: {text}; {last_checkpoint(checkpoint)} ({hint})") from None
        if os.path.exists(checkpoint.path):
            os.remove(checkpoint.path)
        if run.lock:
            run.lock.release()
        print(f"{label}: final avg {result['final']['avg']:.2f} % in {fmt_seconds(result['wall_time_s'])} -> "
              f"{run.stem}.json", flush=True)
    return summarize_folder(plan.folder) if summarize else ""


def last_checkpoint(checkpoint: Checkpoint) -> str:
    exists = os.path.exists(checkpoint.path)
    return f"the last checkpoint is {checkpoint.path}" if exists else "no checkpoint was saved"


def provenance(device) -> dict:
    """What made a result: the software, the device, and the loss implementation that actually ran."""
    return {"torch": torch.__version__, "python": platform.python_version(), "dgr_commit": git_commit(),
            "device": str(device), "cpu": cpu_model(), "impl": impl_in_use(device)}


def impl_in_use(device) -> str:
    """The losses' implementation that serves `device` now: ext (the fused op) or torch."""
    return "ext" if use_extension(torch.empty(0, device=device)) else "torch"


@functools.cache
def git_commit() -> str | None:
    """The commit of dgr.py's checkout ('+changes' if dgr.py or csrc/ differ from it), or None outside git."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *cmd: subprocess.run(["git", "-C", here, *cmd], capture_output=True, text=True,
                                          timeout=10)
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--", "dgr.py", "csrc")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


@functools.cache
def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    cpu = cpu_model()
    return f"{cpu if 'CPU' in cpu else cpu + ' CPU'}, {n} thread{'s' if n > 1 else ''}"


# ------------------------------------------------------------------------------------------------------------
# Figures and tables, made from the results JSON in an experiment folder, a set per configuration.


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str) -> str:
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)
    return path


def save_sample_rows(rows: list[tuple[str, torch.Tensor]], title: str, path: str) -> None:
    """Sample grid: one labelled row per (label, images) pair, images mapped from [-1, 1]."""
    from torchvision.utils import make_grid
    plt = pyplot()
    images = torch.cat([x[:SAMPLES_PER_ROW].detach().float().cpu() for _, x in rows])
    if images.dim() != 4:   # vectors: nothing to draw
        return
    pad, h = 2, images.shape[2]
    grid = make_grid(images, nrow=SAMPLES_PER_ROW, padding=pad, normalize=True, value_range=(-1, 1),
                     pad_value=1.0)
    fig, ax = plt.subplots(figsize=(0.55 * SAMPLES_PER_ROW + 1.2, 0.55 * len(rows) + 0.7))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(rows))], [name for name, _ in rows],
                  fontsize=8)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def sample_figure(label: str, key: str, rows: list, generators: list = ()) -> tuple[list, str]:
    """The labelled rows and title of a run's sample grid `key`: 'tasks' (after each task), 'links' (each
    link of the chain), 'task<k>' (task k's generator at the generator steps of Budget.sample_at). Rows of
    a measured generator (measure_generator) name its train-on-generated accuracy and effective classes."""
    measured = {m["task"]: f"\n{m['train_on_generated']:.1f} %, {m['effective_classes']:.1f} cl."
                for m in generators}
    note = "\nby each row: a solver trained on its samples (test %), effective classes" if measured else ""
    if key == "tasks":
        return ([(f"after task {k}{measured.get(k, '')}", x) for k, x in rows],
                f"{label}: the generator's samples after each task{note}")
    if key == "links":
        return ([(f"link {k}{measured.get(k, '')}", x) for k, x in rows],
                f"{label}: samples of each link's generator{note}")
    return [(f"step {k}", x) for k, x in rows], f"{label}: task {key[4:]}'s generator during training"


def seeds_text(seeds: list[int]) -> str:
    seeds = sorted(seeds)
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds))


def thousands(ax) -> None:
    """Step axes in thousands ('10k'), so that their labels do not run together."""
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x else "0"))


def mean_band(ax, x, ys: list[list[float]], **style):
    """Plot the mean over seeds of the curves `ys` (one per seed, same x), with a +-sd band over several."""
    ys = [y[:min(map(len, ys))] for y in ys]
    mean = [statistics.mean(col) for col in zip(*ys)]
    line, = ax.plot(x[:len(mean)], mean, **style)
    if len(ys) > 1:
        sd = [statistics.stdev(col) for col in zip(*ys)]
        ax.fill_between(x[:len(mean)], [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                        color=line.get_color(), alpha=0.2, lw=0)
    return mean


def plot_experiment(results: list[dict], path: str, setting: str = "") -> str:
    """The accuracy figure of runs of one configuration: for each variant, each task's test accuracy during
    training (tasks' boundaries dotted); the average over the tasks seen (chain: each solver's accuracy);
    the final accuracy of each variant. With several seeds, means with a +-sd band. `setting` names what
    sets these runs apart from others in their folder."""
    plt = pyplot()
    by_variant = group_results(results)
    variants = [v for v in VARIANTS if v in by_variant]
    first = by_variant[variants[0]][0]
    e, budget = EXPERIMENTS[first["exp"]], first["config"]["budget"]
    chain = e.chain
    iters = budget["solver_iters"]
    top = [f"v{i}" for i in range(len(variants))] if len(variants) > 1 else ["v0", "v0"]
    bottom = ["avg"] * (len(top) - 1) + ["final"]
    fig, axes = plt.subplot_mosaic([top, bottom], figsize=(max(9.0, 3.3 * len(top)), 7.0))
    lows = []
    for i, v in enumerate(variants):
        ax, runs = axes[f"v{i}"], by_variant[v]
        for j, name in enumerate(runs[0]["tasks"]):
            pick = (lambda c: (c["step"] - 1) // iters == j) if chain else (lambda c: len(c["acc"]) > j)
            points = [[(c["step"], c["acc"][0 if chain else j]) for c in r["curves"] if pick(c)]
                      for r in runs]
            if points[0]:
                steps = [s for s, _ in points[0]]
                mean_band(ax, steps, [[a for _, a in p] for p in points], label=name, lw=1.2)
        for k in range(1, len(runs[0]["tasks"])):
            ax.axvline(k * iters, color="0.7", ls=":", lw=0.8)
        ax.set(title=f"{runs[0]['name']}" + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""),
               xlabel="solver steps" + (" (links)" if chain else " (tasks)"), ylabel="test accuracy (%)",
               ylim=(0, 101))
        thousands(ax)
        ax.legend(fontsize=7, ncol=2 if len(runs[0]["tasks"]) > 5 else 1, loc="lower left")
    ax, finals, curves = axes["avg"], {}, {}
    for v in variants:
        runs = by_variant[v]
        if chain:
            curves[v] = list(range(1, len(runs[0]["final"]["acc"]) + 1)), [r["final"]["acc"] for r in runs]
            finals[v] = [r["final"]["acc"][-1] for r in runs]
        else:
            curves[v] = ([c["step"] for c in runs[0]["curves"]],
                         [[c["avg"] for c in r["curves"]] for r in runs])
            finals[v] = [r["final"]["avg"] for r in runs]
    # the axis shows the variants within 25 points of the best final accuracy; the others are named below it
    best = max(statistics.mean(f) for f in finals.values())
    shown = [v for v in variants if statistics.mean(finals[v]) > best - 25]
    for v in variants:
        below = "" if v in shown else f" (final {statistics.mean(finals[v]):.1f}, below)"
        name = by_variant[v][0]["name"] + below
        mean = mean_band(ax, *curves[v], label=name, lw=1.2, **({"marker": "o"} if chain else {}))
        if v in shown:
            lows.append(min(mean))
    if chain:
        ax.set(xlabel="solver (link of the chain)", title="Accuracy of each solver on MNIST",
               xticks=curves[v][0])
    else:
        for k in range(1, len(first["tasks"])):
            ax.axvline(k * iters, color="0.7", ls=":", lw=0.8)
        ax.set(xlabel="solver steps (tasks)", title="Average accuracy over the tasks seen")
        thousands(ax)
    ax.set(ylabel="test accuracy (%)", ylim=(max(0, math.floor(min(lows) - 1)), 100.5))
    ax.legend(fontsize=8, loc="lower left")
    ax = axes["final"]
    ax.axis("off")
    rows = [[by_variant[v][0]["name"], str(len(finals[v])), mean_sd(finals[v])] for v in variants]
    table = ax.table(rows, colLabels=["variant", "seeds", "solver 5 (%)" if chain else "final avg (%)"],
                     loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.5)
    ax.set_title("Final accuracy" + (" (mean ± sd)" if any(len(f) > 1 for f in finals.values()) else ""))
    seeds = sorted({r["seed"] for runs in by_variant.values() for r in runs})
    several = any(len(runs) > 1 for runs in by_variant.values())
    fig.suptitle(f"{e.title}: {first['config']['args']['preset']} preset, {seeds_text(seeds)}"
                 + (" (mean ± sd over seeds)" if several else "") + (f"\n{setting}" if setting else ""))
    fig.tight_layout()
    return save_figure(fig, path)


RESULT_FIELDS = {"exp": str, "variant": str, "seed": int, "name": str, "tasks": list, "curves": list,
                 "final": dict, "config": dict, "wall_time_s": (int, float), "machine": str}


def result_problem(res) -> str | None:
    """Why a parsed JSON is not a result of dgr.py, or None."""
    if not isinstance(res, dict):
        return f"a {type(res).__name__}, not an object"
    missing = [k for k, kind in RESULT_FIELDS.items() if not isinstance(res.get(k), kind)]
    if missing:
        return "no " + ", ".join(missing)
    if res["exp"] not in EXPERIMENTS or res["variant"] not in VARIANTS:
        return f"unknown experiment or variant {res['exp']!r}, {res['variant']!r}"
    return None if isinstance(res["final"].get("acc"), list) else "no final accuracies"


def load_results(folder: str) -> list[dict]:
    """The results in `folder` (<variant>_seed<k>.json); a file of that name that is not one is named on
    stderr and left out."""
    results = []
    for name in sorted(os.listdir(folder)):
        if not (name.endswith(".json") and "_seed" in name):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                res = json.load(f)
            why = result_problem(res)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            why = f"{type(e).__name__}"
        if why:
            print(f"dgr.py: leaving out {path}: not a result of dgr.py ({why})", file=sys.stderr, flush=True)
        else:
            results.append(res)
    return results


def config_of(res: dict) -> dict:
    """The settings of a result that bear on its numbers (run_settings), without its variant and seed, so that
    the variants of one command group together."""
    settings = run_settings({**(res.get("fingerprint") or {}), "exp": res["exp"], "variant": res["variant"]})
    return {k: value for k, value in settings.items() if k not in ("variant", "seed")}


def group_by_config(results: list[dict]) -> list[list[dict]]:
    """Results in groups of one configuration (every setting that two runs both use agrees), largest first."""
    groups: list[list[dict]] = []
    for res in results:
        mine = config_of(res)
        home = next((g for g in groups if all(all(mine[k] == theirs[k] for k in mine.keys() & theirs.keys())
                                              for theirs in map(config_of, g))), None)
        if home is None:
            groups.append([res])
        else:
            home.append(res)
    return sorted(groups, key=len, reverse=True)


def summarize_folder(folder: str) -> str:
    """summary.md and accuracy.png of an experiment's folder from every result in it; a folder that holds
    runs of several configurations gets a table and a figure (accuracy-2.png, ...) for each, named by the
    settings that differ. Returns the summary's text."""
    groups = group_by_config(load_results(folder))
    if not groups:
        return ""
    configs = [config_of(g[0]) for g in groups]
    differ = sorted({k for c in configs for k in c if len({json.dumps(d.get(k)) for d in configs}) > 1})
    texts = []
    for k, (group, config) in enumerate(zip(groups, configs)):
        figure = "accuracy.png" if k == 0 else f"accuracy-{k + 1}.png"
        setting = ", ".join(f"{name} {config.get(name)}" for name in differ) if len(groups) > 1 else ""
        plot_experiment(group, os.path.join(folder, figure), setting)
        texts.append(summary_table(group, setting and f"{setting} ({figure})"))
    text = "\n".join(texts)
    write_text(os.path.join(folder, "summary.md"), text)
    return text


def summary_table(results: list[dict], setting: str = "") -> str:
    """Final accuracy per task and average, and wall time, mean ± sd over seeds, a row per variant. Runs from
    several machines (a cluster's nodes, a folder filled over time) get a column naming each row's, since a
    wall time means nothing without its machine."""
    by_variant = group_results(results)
    first = next(iter(by_variant.values()))[0]
    cols = first["tasks"]
    machines = lambda runs: list(dict.fromkeys(r["machine"] for r in runs))
    mixed = len(machines(results)) > 1
    where = "several machines" if mixed else first["machine"]
    lines = [f"## {first['exp']} ({first['config']['args']['preset']} preset, {where})"
             + (f"; {setting}" if setting else ""), "",
             f"| variant | seeds | {' | '.join(cols)} | average | wall time (s) |" + " machine |" * mixed,
             "|---" * (len(cols) + 4 + mixed) + "|"]
    for runs in by_variant.values():
        per_task = [mean_sd([r["final"]["acc"][j] for r in runs]) for j in range(len(cols))]
        average = mean_sd([r["final"]["avg"] for r in runs])
        seconds = mean_sd([r["wall_time_s"] for r in runs])
        lines.append(f"| {runs[0]['name']} | {len(runs)} | {' | '.join(per_task)} | {average} | {seconds} |"
                     + f" {'; '.join(machines(runs))} |" * mixed)
    return "\n".join(lines + generator_table(by_variant)) + "\n"


def generator_table(by_variant: dict[str, list[dict]]) -> list[str]:
    """The measured generators (measure_generator) of each variant after each task, mean over seeds: the test
    accuracy of a solver trained only on its samples, and its effective classes."""
    measured = {v: runs for v, runs in by_variant.items() if all(r.get("generators") for r in runs)}
    if not measured:
        return []
    tasks = [m["task"] for m in next(iter(measured.values()))[0]["generators"]]
    lines = ["", "Generators: the test accuracy (%) on the tasks so far of a solver trained only on a "
             "generator's samples, labelled by its solver; in brackets, the effective classes among them.",
             "", "| variant | " + " | ".join(f"after task {k}" for k in tasks) + " |",
             "|---" * (len(tasks) + 1) + "|"]
    for runs in measured.values():
        cells = [f"{mean_sd([r['generators'][j]['train_on_generated'] for r in runs])} "
                 f"({statistics.mean(r['generators'][j]['effective_classes'] for r in runs):.1f})"
                 for j in range(len(tasks))]
        lines.append(f"| {runs[0]['name']} | " + " | ".join(cells) + " |")
    return lines


def group_results(results: list[dict]) -> dict[str, list[dict]]:
    """Runs by variant (in VARIANTS' order), each variant's runs by seed."""
    by_variant: dict[str, list[dict]] = {}
    for res in sorted(results, key=lambda r: r["seed"]):
        by_variant.setdefault(res["variant"], []).append(res)
    return {v: by_variant[v] for v in VARIANTS if v in by_variant}


def mean_sd(xs: list[float]) -> str:
    """'94.63 ± 0.15' over several values, '94.63' for one."""
    return f"{statistics.mean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


# ------------------------------------------------------------------------------------------------------------
# Command line: every refusal is one line and exit 2, before anything heavy starts; a stopped run, exit 3.


def arg(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Args:
    exp: str = arg("permuted", f"experiment(s), comma-separated, or all: {', '.join(EXPERIMENTS)}")
    variants: str = arg("gr,er,noise,none", "comma-separated, among gr, gr+distill, er, ewc, noise, none")
    preset: str = arg("auto", "budgets: paper, fast (CPU), quick (smoke); auto: paper with CUDA, else fast",
                      ("auto", "paper", "fast", "quick"))
    budget: str = arg("", "override the preset's budget: name=value,... of Budget's fields (dgr.py), e.g. "
                      "solver_iters=500,gan=mlp; may be given more than once")
    seeds: int = arg(1, "number of seeds; runs seeds K..K+N-1 (K: --seed-start)")
    seed_start: int = arg(0, "first seed K; a job array can run one seed per job into one shared --out")
    jobs: int = arg(1, "run up to N runs (experiment x variant x seed) at once, a process each; CPU threads "
                    "split N ways")
    r: float = arg(None, "real-data share r in [0,1] on tasks after the first (default 1/i on task i)")
    replay_targets: str = arg("hard", "label replayed inputs with the old solver's argmax (hard) or its "
                              "probabilities (soft)", ("hard", "soft"))
    data_dir: str = arg("", "dataset root for torchvision MNIST/SVHN (default $DGR_DATA or ./data)")
    out: str = arg("results", "output folder: <out>/<exp>/<variant>_seed<k>.json, figures, summary.md")
    device: str = arg("auto", "torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    impl: str = arg("auto", "losses: fused C++/CUDA op (ext), PyTorch (torch), auto: ext if it loads",
                    ("auto", "ext", "torch"))
    graphs: str = arg("auto", "whole steps as CUDA graphs: auto (on with CUDA, off on the CPU), on, off",
                      ("auto", "on", "off"))
    checkpoint_every: int = arg(1000, "checkpoint every k solver or generator steps too (0: task ends only)")
    resume: bool = arg(False, "continue killed runs from their checkpoints in --out; skip finished ones")
    overwrite: bool = arg(False, "replace results and checkpoints already in --out")
    detect_anomaly: bool = arg(False, "torch.autograd anomaly detection (slow; for debugging NaNs)")
    estimate: bool = arg(False, "print the runs to do and their expected time (steps timed here), then exit")


def budget_overrides(text: str) -> dict:
    """`name=value,...` -> {name: value} with each value of its Budget field's type; ValueError if bad."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in BUDGET_DEFAULTS or not value:
            raise ValueError(f"{item!r} is not name=value with a name among {', '.join(BUDGET_DEFAULTS)}")
        if name in out:
            raise ValueError(f"{name} is given twice")
        kind = type(BUDGET_DEFAULTS[name])
        try:
            out[name] = tuple(int(v) for v in value.split(":")) if kind is tuple else kind(value)
        except ValueError:
            raise ValueError(f"{name} takes {TYPE_NAMES[kind]}, got {value!r}") from None
        if (why := budget_field_error(name, out[name])):
            raise ValueError(why)
    return out


def budget_for(args: Args, exp: str) -> Budget:
    """The preset's budget of `exp` with --budget's overrides (args.preset resolved, not auto)."""
    return dataclasses.replace(PRESETS[args.preset][exp], **budget_overrides(args.budget))


class UsageError(Exception):
    """Bad input from the user: reported as one line and exit code 2, never as a traceback."""


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows an option's default where it says something (not for flags, an unset --r, --data-dir)."""
    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default == ""
        return action.help if unset else super()._get_help_string(action)


MAX_SEEDS, MAX_SEED = 1000, 10 ** 9   # seeds per command (a job array covers more), the largest seed


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(prog="dgr.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpWithDefaults)
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif f.name == "budget":   # may be given more than once: the overrides add up
            parser.add_argument(flag, action="append", default=[], help=f.metadata["help"])
        else:
            kind = float if f.name == "r" else type(f.default)
            parser.add_argument(flag, type=kind, default=f.default, choices=f.metadata["choices"],
                                help=f.metadata["help"])
    given = vars(parser.parse_args(argv))
    args = Args(**{**given, "budget": ",".join(given["budget"])})
    args.data_dir = args.data_dir or os.environ.get("DGR_DATA", "./data")
    check_args(args)
    return args


def check_args(args: Args) -> None:
    bad = [e for e in experiment_list(args) if e not in EXPERIMENTS]
    if bad or not experiment_list(args):
        raise UsageError(f"unknown experiment {', '.join(bad) or '(none given)'}: choose from "
                         f"{','.join(EXPERIMENTS)} or all")
    bad = [v for v in variant_list(args) if v not in VARIANTS]
    if bad or not variant_list(args):
        raise UsageError(f"unknown variant {', '.join(bad) or '(none given)'}: choose from "
                         f"{','.join(VARIANTS)}")
    if args.r is not None and not 0.0 <= args.r <= 1.0:
        raise UsageError(f"--r must lie in [0, 1], got {args.r}")
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise UsageError(f"--seeds must lie in [1, {MAX_SEEDS}], got {args.seeds} (a job array covers more, "
                         "with --seed-start)")
    if not 0 <= args.seed_start <= MAX_SEED - args.seeds + 1:
        raise UsageError(f"--seed-start must lie in [0, {MAX_SEED - args.seeds + 1}], got {args.seed_start}")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    if not args.out.strip():
        raise UsageError("--out is empty: name a folder for the results")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    try:
        budget_overrides(args.budget)
    except ValueError as e:
        raise UsageError(f"--budget: {e}") from None


def experiment_list(args: Args) -> list[str]:
    names = [e.strip().lower() for e in args.exp.split(",") if e.strip()]
    return list(EXPERIMENTS) if names == ["all"] else list(dict.fromkeys(names))


def variant_list(args: Args) -> list[str]:
    return list(dict.fromkeys(v.strip().lower() for v in args.variants.split(",") if v.strip()))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: dgr.py runs on cpu or cuda (cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= (n := torch.cuda.device_count()):
        raise UsageError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return device


def plan_experiment(exp: str, args: Args, b: Budget, folder: str, runs_on: dict) -> ExperimentPlan:
    """The runs to do; checks what --out already holds first, so that a refusal (exit 2) comes before
    anything in it is touched. With --estimate it reads --out as --resume would and changes nothing."""
    for variant in variant_list(args):
        if variant not in EXPERIMENTS[exp].variants:
            where = ", ".join(name for name, e in EXPERIMENTS.items() if variant in e.variants)
            raise UsageError(f"variant {variant} applies to {where}, not {exp}")
    runs, held = [], []
    resume = args.resume or (args.estimate and not args.overwrite)
    for variant in variant_list(args):
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            stem = os.path.join(folder, f"{variant}_seed{seed}")
            fingerprint = run_fingerprint(exp, variant, seed, args, b, runs_on)
            fits = functools.partial(state_problem, e=EXPERIMENTS[exp], variant=variant, b=b)
            checkpoint = Checkpoint(stem + ".ckpt", args.checkpoint_every, fingerprint, fits)
            if (holder := RunLock(stem + ".lock").holder()):
                raise UsageError(busy(stem, holder))
            done = os.path.exists(stem + ".json")
            if (done or os.path.exists(checkpoint.path)) and not args.overwrite:
                held.append(stem)
            if resume and os.path.exists(checkpoint.path):
                try:
                    checkpoint.load()
                except ValueError as e:
                    raise UsageError(f"{e}; delete it, pass --overwrite to start afresh, or choose another "
                                     "--out") from None
            elif resume and done:
                saved = saved_fingerprint(stem + ".json")
                if (why := run_mismatch(saved, fingerprint)):
                    raise UsageError(f"{stem}.json {why}; pass --overwrite to replace it or choose another "
                                     "--out")
                print(f"{stem}.json: finished earlier, kept", flush=True)
                continue
            runs.append(PlannedRun(exp, variant, seed, stem, checkpoint))
    if held and not (resume or args.overwrite):
        raise UsageError(f"{folder} already holds results or checkpoints of these runs ({len(held)}): pass "
                         "--resume to continue them, --overwrite to replace them, or choose another --out")
    return ExperimentPlan(b, folder, runs)


def saved_fingerprint(path: str) -> dict:
    """The fingerprint of the result at `path`, or a UsageError saying that it is not a readable result."""
    try:
        with open(path) as f:
            res = json.load(f)
        if not isinstance(res, dict) or not isinstance(res.get("fingerprint"), dict):
            raise ValueError("no fingerprint")
        return res["fingerprint"]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{path} is not a readable result of dgr.py ({type(e).__name__}: {e}); pass "
                         "--overwrite to replace it, or choose another --out") from None


def take_runs(plans: dict[str, ExperimentPlan], args: Args, hold: bool) -> None:
    """Lock every planned run (UsageError naming the holder if another process has one); with `hold`, keep
    the locks (this process trains the runs), clear what killed processes left of them (temp files) and,
    with --overwrite, their old checkpoints; without, let them go again (--jobs: each run locks its own)."""
    taken = []
    try:
        for plan in plans.values():
            for run in plan.runs:
                lock = RunLock(run.stem + ".lock")
                if (holder := lock.acquire()):
                    raise UsageError(busy(run.stem, holder))
                taken.append(lock)
                run.lock = lock if hold else None
                if hold and args.overwrite and os.path.exists(run.checkpoint.path):
                    os.remove(run.checkpoint.path)
            if hold:
                remove_stale_temp_files(plan.folder, [run.stem for run in plan.runs])
    except BaseException:
        for lock in taken:
            lock.release()
        raise
    if not hold:
        for lock in taken:
            lock.release()


def busy(stem: str, holder: str) -> str:
    return f"{stem} is being trained by {holder} (its lock {stem}.lock): wait for it, or choose another --out"


def check_writable(folder: str) -> None:
    """Make `folder` and write a file in it, or one UsageError naming the folder and the reason."""
    import tempfile
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"cannot write results to {os.path.abspath(folder)} ({e.strerror or e}); choose "
                         "another --out") from None


def announce(exp: str, plan: ExperimentPlan, device, graphs: bool) -> tuple[float, dict[str, float]]:
    """Print the runs to do and their expected time (from step costs timed here); return both."""
    e, runs, b = EXPERIMENTS[exp], plan.runs, plan.b
    if not runs:
        print(f"{exp}: nothing to do", flush=True)
        return 0.0, {}
    sources = {VARIANTS[run.variant].past(e.lwf) for run in runs} - {"none"}
    costs = step_costs(e, b, device, sorted(sources), graphs)
    seconds = sum(run_seconds(e, run.variant, b, costs, run.checkpoint.at) for run in runs)
    per_step = ", ".join(f"{kind} {1e3 * c:.1f} ms" for kind, c in costs.items())
    resumed = sum(run.checkpoint.at != (0, 0) for run in runs)
    print(f"{exp}: {len(runs)} run(s) to do{f' ({resumed} resumed)' if resumed else ''}, expected about "
          f"{fmt_seconds(seconds)} on {machine_name(device)} (per step: {per_step}; a generator step "
          f"includes its {b.n_critic} critic steps)", flush=True)
    return seconds, costs


RUN_COMMAND = [sys.executable, os.path.abspath(__file__)]   # how --jobs starts a run (patched_dgr.py: itself)
JOB_ENV = "DGR_JOB_COSTS"   # set by --jobs for the runs it starts: the step costs it timed, by experiment


def run_processes(argv: list[str], args: Args, plans: dict[str, ExperimentPlan],
                  runs: list[tuple[float, PlannedRun]], costs: dict) -> list[str]:
    """--jobs N: each run to do, (expected seconds, run), in its own process (this script with --exp E
    --variants V --seed-start k --seeds 1), at most N at once, the longest expected first, all into --out
    (on a CPU each with its share of the threads). The runs reuse the step costs timed here (JOB_ENV) and
    leave the figures and summaries to this process. A failed run does not stop the others; a refused one
    (exit 2) skips the rest of its experiment, which would be refused alike. Ctrl-C or SIGTERM here reaches
    each run once (they run in sessions of their own), and each stops after its step with a checkpoint.
    Then the figures and summary of each experiment from every result in its folder."""
    import subprocess
    runs = sorted(runs, key=lambda pair: pair[0], reverse=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), JOB_ENV: json.dumps(costs)}
    one = lambda run: ["--jobs", "1", "--preset", args.preset, "--exp", run.exp, "--variants", run.variant,
                       "--seed-start", str(run.seed), "--seeds", "1"]
    pending = [(run.exp, run.label, [*RUN_COMMAND, *argv, *one(run)]) for _, run in runs]
    running, failed, refused, signum = [], [], {}, 0
    while pending or running:
        try:
            while pending and len(running) < args.jobs and not signum:
                exp, label, cmd = pending.pop(0)
                running.append((exp, label, subprocess.Popen(cmd, env=env, start_new_session=True)))
            for exp, label, p in [job for job in running if job[2].poll() is not None]:
                running.remove((exp, label, p))
                if p.returncode == 2:
                    refused[exp] = refused.get(exp, 0) + 1 + sum(e == exp for e, *_ in pending)
                    pending = [job for job in pending if job[0] != exp]
                elif p.returncode and not signum:
                    failed.append(label)
            time.sleep(0.1)
        except Interrupted as e:   # to each run once; a second signal here stops the runs at once
            for *_, p in running:
                p.send_signal(signal.SIGKILL if signum else e.signum)
            signum, pending = signum or e.signum, []
    if signum:
        raise Interrupted(signum, "the runs stopped after their step, with a checkpoint")
    summaries = [summarize_folder(plan.folder) for plan in plans.values() if os.path.isdir(plan.folder)]
    if failed or refused:
        print("\n".join(summaries))
        raise RunStopped("; ".join([f"{exp} refused, {n} run(s) not done" for exp, n in refused.items()] +
                                   [f"{label} failed" for label in failed]) + " (the messages are above)")
    return summaries


def data_problem(exp: str, args: Args, download: bool = True) -> str | None:
    """Why the datasets of `exp` cannot be had, else None: not in --data-dir and not downloadable (with
    download=False nothing is fetched), or MNIST's files damaged (SVHN's are checked as they load)."""
    needs = {"MNIST": mnist_paths(args.data_dir)}
    if EXPERIMENTS[exp].svhn:
        needs["SVHN"] = svhn_paths(args.data_dir)
    for name, paths in needs.items():
        if all(os.path.exists(p) for p in paths):
            if name == "MNIST" and (why := mnist_files_problem(paths)):
                return why
            continue
        if not download:
            return f"{name} is not in {os.path.abspath(os.path.dirname(paths[0]))}"
        try:
            (load_mnist if name == "MNIST" else load_svhn)(args.data_dir, torch.device("cpu"))
        except DataError as e:
            return str(e)
    return None


def configure(args: Args) -> tuple[Args, torch.device, bool, dict]:
    """Apply the options that set up the process (--impl, anomaly detection): args with the preset resolved,
    the device to run on, whether steps run as CUDA graphs, and what the runs run on (the fingerprint's
    device, impl, graphs). Raises UsageError for a bad combination."""
    device = resolve_device(args.device)
    if args.preset == "auto":
        args = dataclasses.replace(args, preset="paper" if device.type == "cuda" else "fast")
        print(f"preset {args.preset}: " + ("CUDA is available" if device.type == "cuda" else
              "no CUDA; the paper preset's GR takes hours per run on a CPU (--preset paper to insist)"),
              flush=True)
    set_impl(args.impl)
    if args.impl == "ext":
        try:
            use_extension(torch.empty(0, device=device), "ext")
        except RuntimeError as e:
            raise UsageError(f"--impl ext: {e}") from None
    if args.graphs == "on" and device.type != "cuda":
        raise UsageError(f"--graphs on: CUDA graphs need a CUDA device, not {device}")
    graphs = args.graphs == "on" or (args.graphs == "auto" and device.type == "cuda")
    torch.autograd.set_detect_anomaly(args.detect_anomaly)
    return args, device, graphs, {"device": device.type, "impl": impl_in_use(device), "graphs": graphs}


USAGE = """dgr.py: Continual Learning with Deep Generative Replay (Shin et al., NeurIPS 2017).

  python dgr.py --exp split --preset quick     # a one-minute look: split MNIST, GR, ER, Noise, None
  python dgr.py --exp split                    # split MNIST: fast preset on a CPU, paper preset on a GPU
  python dgr.py --exp all --estimate           # how long every experiment takes on this machine
  bash reproduce.sh                            # every experiment of the paper
  python dgr.py --help                         # every option

Results (a JSON per run, accuracy.png, sample grids, summary.md) go to --out (default results/)."""


def resume_command(argv: list[str]) -> str:
    """The command that continues this one: the same options, --resume instead of --overwrite."""
    kept = [a for a in argv if a not in ("--overwrite", "--resume")]
    return shlex.join(["python", "dgr.py", *kept, "--resume"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(USAGE)
        return 0
    with StopRequest().installed() as stop:
        return run_command(argv, stop)


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e)))


def run_command(argv: list[str], stop: StopRequest) -> int:
    """main's work: plan, refuse (exit 2) or announce, run (exit 3 if a run stops, 128 + signal if stopped).
    """
    skipped, plans = [], {}
    try:
        args, device, graphs, runs_on = configure(parse_args(argv))
        for exp in experiment_list(args):
            b = budget_for(args, exp)
            plans[exp] = plan_experiment(exp, args, b, os.path.join(args.out, exp), runs_on)
        child = os.environ.get(JOB_ENV)   # a run started by --jobs: its parent did the planning
        if not args.estimate:   # every refusal (exit 2) before anything heavy starts
            for plan in plans.values():
                check_writable(plan.folder)
        problems = {} if child else {exp: why for exp, plan in plans.items() if plan.runs and
                                     (why := data_problem(exp, args, download=not args.estimate))}
        if problems and not args.estimate:
            if len(problems) == sum(bool(plan.runs) for plan in plans.values()):
                raise UsageError(next(iter(problems.values())))
            for why in dict.fromkeys(problems.values()):
                print(f"dgr.py: not running {', '.join(e for e in problems if problems[e] == why)}: {why}",
                      file=sys.stderr, flush=True)
            skipped = list(problems)
            for exp in skipped:   # the folder check_writable made, if nothing else is in it
                with contextlib.suppress(OSError):
                    os.rmdir(plans[exp].folder)
            plans = {exp: plan for exp, plan in plans.items() if exp not in problems}
        elif problems:
            for exp, why in problems.items():
                print(f"{exp}: would be refused: {why}", flush=True)
        n_runs = sum(len(plan.runs) for plan in plans.values())
        jobs = min(args.jobs, n_runs)
        if not args.estimate:
            take_runs(plans, args, hold=jobs <= 1)
        if jobs > 1 and device.type == "cpu":   # each run's share of the cores; its steps are timed so
            torch.set_num_threads(max(1, torch.get_num_threads() // jobs))
        if child:
            expected = {exp: (0.0, json.loads(child)[exp]) for exp in plans}
        else:
            expected = {exp: announce(exp, plan, device, graphs) for exp, plan in plans.items()}
        per_run = [(run_seconds(EXPERIMENTS[exp], run.variant, plan.b, expected[exp][1], run.checkpoint.at),
                    run) for exp, plan in plans.items() for run in plan.runs]
        if jobs > 1:
            at_once = fmt_seconds(makespan([seconds for seconds, _ in per_run], jobs))
            if device.type == "cpu":
                n = torch.get_num_threads()
                print(f"expected in all with --jobs {jobs} (runs at once, {n} thread{'s' if n > 1 else ''} "
                      f"each): about {at_once}", flush=True)
            else:   # runs at once share one GPU: somewhere between these (reference/README.md)
                one_by_one = fmt_seconds(sum(seconds for seconds, _ in per_run))
                print(f"expected in all with --jobs {jobs} (runs at once sharing one GPU): between about "
                      f"{at_once} (if they did not slow each other down) and {one_by_one} (one after "
                      "another)", flush=True)
        elif len(plans) > 1 and not child:
            print(f"expected in all: about {fmt_seconds(sum(s for s, _ in expected.values()))}", flush=True)
        if args.estimate:
            return 0
        if jobs > 1:
            costs = {exp: costs for exp, (_, costs) in expected.items()}
            summaries = run_processes(argv, args, plans, per_run, costs)
        else:
            summaries = [run_experiment(EXPERIMENTS[exp], args, device, plan, expected[exp][1], stop, graphs,
                                        summarize=not child) for exp, plan in plans.items()]
        summaries = [text for text in summaries if text]
        if len(summaries) > 1:
            write_text(os.path.join(args.out, "summary.md"), "\n".join(summaries))
    except (UsageError, DataError) as e:
        print(f"dgr.py: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"dgr.py: stopped: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        what = e.saved or "before any run had trained; nothing is lost"
        then = "" if os.environ.get(JOB_ENV) else f"; continue with: {resume_command(argv)}"   # said once
        print(f"dgr.py: interrupted: {what}{then}", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:
        if not out_of_memory(e):
            raise
        reason = (str(e).splitlines() or [""])[0][:160]
        print(f"dgr.py: stopped: out of memory ({type(e).__name__}: {reason}); smaller budgets (--budget "
              "width=..., batch=..., gen_batch=...) or another device", file=sys.stderr)
        return 3
    finally:
        for plan in plans.values():
            for run in plan.runs:
                if run.lock:
                    run.lock.release()
    if summaries:
        print("\n".join(summaries))
        print(f"results, figures and summary.md are in {os.path.abspath(args.out)}")
    if skipped:
        print(f"dgr.py: stopped: {', '.join(skipped)} not run (the reason is above)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
