"""What limits GR on split MNIST: how good the generator's samples are after each task.

One GR run of dgr.py (its options, e.g. --preset fast --budget ...), and after each task an independent
judge, a small CNN trained here on all of MNIST (its test accuracy is printed), looks at N samples of the
scholar's generator, the ones the next task replays:
  - which digits they are (a histogram by the judge's label; balance over the classes seen so far),
  - how many are clear digits (judge's confidence > 0.9),
  - how often the scholar's own solver, whose labels the next solver learns, names the judge's digit,
    on all samples and on the clear ones.
The hook restores the random stream, so the run's accuracies are those of the same run without it.
With --labels judge the replayed samples are labelled by the judge instead of the old solver (its digit
among the classes learnt so far): an oracle labelling that splits GR's loss between its inputs and its labels.
With --clear-only judge (or solver) only the samples the judge (or the old solver) reads as a clear digit
are replayed, to the solver and to the next generator.

  python reference/frontier/sample_quality.py --preset fast --out reference/frontier/sample-quality/fast
  python reference/frontier/sample_quality.py --preset paper --budget solver_schedule=cosine --graphs on
"""
import argparse
import dataclasses
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import dgr  # noqa: E402

CLEAR = 0.9   # the judge's confidence above which a sample counts as a clear digit


def train_judge(data, device, steps: int = 1500, seed: int = 123) -> tuple[nn.Module, float]:
    """A CNN (conv 16-32, fc 128) trained on all MNIST classes; its test accuracy (%)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    judge = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    opt = torch.optim.Adam(judge.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(len(x_train), (128,), device=device)
        loss = F.cross_entropy(judge(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    judge.eval().requires_grad_(False)
    with torch.no_grad():
        correct = sum(int((judge(x).argmax(1) == y).sum()) for x, y in zip(x_test.split(2000), y_test.split(2000)))
    return judge, 100.0 * correct / len(y_test)


def judge_reads(judge: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The judge's digit for each sample, and whether it reads it as a clear digit (p > CLEAR)."""
    confidence, digit = judge(x).softmax(1).max(1)
    return digit, confidence > CLEAR


@torch.no_grad()
def judge_samples(scholar: dgr.Scholar, judge: nn.Module, n: int, seen: int) -> dict:
    """The judge's view of n samples of the scholar's generator; `seen`: classes 0..seen-1 learnt so far."""
    x = scholar.sample(n)
    digit, clear = judge_reads(judge, x)
    named = scholar.label(x)
    hist = torch.bincount(digit, minlength=10)
    confusion = torch.zeros(10, 10, dtype=torch.long, device=x.device)
    confusion.index_put_((digit, named), torch.ones_like(digit), accumulate=True)
    off = sorted(((int(confusion[i, j]), i, j) for i in range(10) for j in range(10) if i != j), reverse=True)
    return {"judge_digits": hist.tolist(),
            "seen_classes_min_max": [int(hist[:seen].min()), int(hist[:seen].max())],
            "unseen_share": round(float(hist[seen:].sum()) / n, 4),
            "clear_share": round(float(clear.float().mean()), 4),
            "solver_agrees": round(float((named == digit).float().mean()), 4),
            "solver_agrees_on_clear": round(float((named == digit)[clear].float().mean()), 4) if clear.any()
                                      else None,
            "top_confusions": [f"{i}->{j}: {c}" for c, i, j in off[:5]]}


class JudgeLabels:
    """The old scholar, but its replayed samples get the judge's digit among the `seen` classes learnt so far
    instead of its solver's label (an oracle labelling; soft targets: the judge's softmax over those)."""

    def __init__(self, old: dgr.Scholar, judge: nn.Module, seen: int):
        self.old, self.judge, self.seen = old, judge, seen

    def __getattr__(self, name):   # sample(), solver, ...: the old scholar's
        return getattr(self.old, name)

    @torch.no_grad()
    def label(self, x: torch.Tensor, head: int = 0, soft: bool = False, temperature: float = 1.0) -> torch.Tensor:
        logits = self.judge(x)[:, :self.seen]
        return F.pad((logits / temperature).softmax(1), (0, 10 - self.seen)) if soft else logits.argmax(1)


class ClearOnly:
    """The old scholar, but it replays only samples its `judge` or its solver (`by`) reads as a clear digit
    (probability above CLEAR; the judge's digit also among the `seen` classes learnt so far)."""

    def __init__(self, old: dgr.Scholar, judge: nn.Module, seen: int, by: str):
        self.old, self.judge, self.seen, self.by = old, judge, seen, by

    def __getattr__(self, name):   # label(), solver, ...: the old scholar's
        return getattr(self.old, name)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        kept, have = [], 0
        for _ in range(20):   # at most 20 draws of n, then whatever the last draw gave fills the rest
            x = self.old.sample(n)
            if self.by == "judge":
                digit, clear = judge_reads(self.judge, x)
                clear &= digit < self.seen
            else:
                clear = self.old.solver(x).softmax(1).max(1).values > CLEAR
            kept.append(x[clear])
            have += int(clear.sum())
            if have >= n:
                break
        return torch.cat(kept + [x[~clear]])[:n]


def prepare(script: str, exp: str, rest: list[str], check=lambda args: None):
    """dgr.py's options `rest` for experiment `exp` (variant gr unless they name another), checked by
    `check` (which raises dgr.UsageError), the device set up and the data loaded: (args, device, data,
    budget); or None, the error printed for an exit status of 2 (a bad option; MNIST missing offline)."""
    try:
        args = dgr.parse_args(["--exp", exp, "--variants", "gr", *rest])
        check(args)
        device, _ = dgr.configure(args)
        data = dgr.load_data(exp, args, device)
    except (dgr.UsageError, FileNotFoundError) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return None
    return args, device, data, dgr.budget_for(args, exp)


def write_report(out: str, report: dict, wall: float, device, b: dgr.Budget) -> None:
    """A script's report as JSON at `out`, with the run's wall time, machine and budget."""
    dgr.write_json(out, {**report, "wall_time_s": round(wall, 2), "machine": dgr.machine_name(device),
                         "budget": dataclasses.asdict(b)})
    print(f"-> {out}")


def main() -> int:
    own = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="every other option is dgr.py's (python dgr.py --help); "
                                         "--exp is split, --variants gr")
    own.add_argument("--samples", type=int, default=5000, help="generator samples judged after each task")
    own.add_argument("--seed", type=int, default=0, help="the run's seed")
    own.add_argument("--judge-steps", type=int, default=1500, help="training steps of the judge (batch 128)")
    own.add_argument("--labels", choices=("solver", "judge"), default="solver",
                     help="who labels the replayed samples: the old solver (GR) or the judge (an oracle)")
    own.add_argument("--clear-only", choices=("no", "judge", "solver"), default="no",
                     help="replay (to the solver and the generator) only samples the judge or the old solver "
                          f"reads as a clear digit (p > {CLEAR})")
    mine, rest = own.parse_known_args()

    def check(args):
        if mine.clear_only != "no" and args.graphs == "on":   # its draws depend on the data: no graph capture
            raise dgr.UsageError("--clear-only runs eager steps: leave --graphs off")
    prepared = prepare("sample_quality.py", "split", rest, check)
    if prepared is None:
        return 2
    args, device, data, b = prepared
    judge, judge_acc = train_judge(data["mnist"], device, mine.judge_steps)
    print(f"judge: CNN, test accuracy {judge_acc:.2f} %", flush=True)
    rows = []
    if mine.labels == "judge" or mine.clear_only != "no":   # each task's replay changed as asked
        make_replay = dgr.make_replay

        def judged_replay(v, exp, args, old, pool, head, ewc):
            replay = make_replay(v, exp, args, old, pool, head, ewc)
            if replay.old is not None and mine.clear_only != "no":
                replay.old = ClearOnly(replay.old, judge, 2 * len(pool), mine.clear_only)
            if replay.old is not None and mine.labels == "judge":
                replay.old = JudgeLabels(replay.old, judge, 2 * len(pool))
            return replay
        dgr.make_replay = judged_replay

    def on_step(run, task, phase, step, info):   # at a task's end, run.stage counts the tasks learnt
        if "acc" in info:   # an evaluation point: a progress line
            print(f"task {task.name} solver step {step}: accuracy {' '.join(f'{a:.1f}' for a in info['acc'])} "
                  f"({time.time() - started:.0f} s)", flush=True)
        if phase != "end":
            return
        with torch.random.fork_rng():   # the run's random stream goes on as if the judge had not looked
            row = {"task": task.name, "acc": [round(a, 2) for a in run.acc_after[-1]],
                   **judge_samples(run.scholar, judge, mine.samples, 2 * run.stage)}
        rows.append(row)
        on_clear = "-" if row["solver_agrees_on_clear"] is None else f"{100 * row['solver_agrees_on_clear']:.1f}"
        print(f"after {row['task']}: accuracy {' '.join(f'{a:.1f}' for a in row['acc'][:run.stage])} | "
              f"judge's digits {row['judge_digits']} | clear {100 * row['clear_share']:.1f} % | solver agrees "
              f"{100 * row['solver_agrees']:.1f} %, on clear {on_clear} % | "
              f"{', '.join(row['top_confusions'][:3])}", flush=True)

    started = time.time()
    result = dgr.run_one("split", "gr", mine.seed, args, data, b, on_step=on_step)
    wall = time.time() - started
    print(f"final average {result['final']['avg']:.2f} % in {wall:.0f} s (the judge's looks included)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, f"sample_quality_seed{mine.seed}.json")
    write_report(out, {"final": result["final"], "after_task": rows, "judge_test_acc": judge_acc,
                       "samples": mine.samples, "clear_above": CLEAR, "seed": mine.seed, "labels": mine.labels,
                       "clear_only": mine.clear_only}, wall, device, b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
