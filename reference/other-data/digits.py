"""dgr's MNIST experiments on data that is not MNIST: scikit-learn's 8x8 handwritten digits (1,797 images of
UCI's optdigits, other writers and another scanner than MNIST's, 17 grey levels), made into the experiment's
tasks (split: 0-1, 2-3, ..., 8-9; permuted: ten orders of the 64 pixels; chain: five links) and learnt by
dgr.py's own runs at a preset's budgets. It asks whether the presets' choices hold on other data, or fit
MNIST. Needs scikit-learn; runs on the CPU.

    pip install scikit-learn
    python reference/other-data/digits.py --exp split --variants gr,er,none --seeds 3 --out results/digits
    python reference/other-data/digits.py --exp split --variants gr --budget replay_batch=0 --out ... \
        --paired results/digits    # each run's difference from the same seed's run there

One JSON per run in --out (one folder per experiment and budget; a run whose JSON is there is skipped), then a
table over the folder's runs. The runs in reference/other-data/ ran with OMP_NUM_THREADS=1, two at once.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import dgr  # noqa: E402


def load_digits():
    """(x_train, y_train, x_test, y_test): pixels 0..16 mapped to [-1, 1]; every third image is a test one."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(8).sub(1).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    test = torch.arange(len(y)) % 3 == 2
    return x[~test], y[~test], x[test], y[test]


def final(res: dict) -> float:
    """A run's result: the average over its tasks at the end; chain's, the last solver's accuracy."""
    return res["final"]["acc"][-1] if res.get("exp") == "chain" else res["final"]["avg"]


def runs_in(folder: str) -> dict[str, list[dict]]:
    """The runs in `folder`, per variant."""
    by_variant = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                res = json.load(f)
            by_variant.setdefault(res["variant"], []).append(res)
    return by_variant


def table(folder: str, paired: str = "") -> str:
    """The runs' results and their generators' train-on-generated accuracy, per variant; with `paired`, a
    folder of runs of other settings, each run's difference from that folder's run of its variant and seed."""
    by_variant = runs_in(folder)
    against = runs_in(paired) if paired else {}
    other = {(v, r["seed"]): final(r) for v, runs in against.items() for r in runs}
    lines = ["| variant | seeds | final (%): average, chain's last solver | per seed | "
             "train on generated, its generators (%) | per seed, minus --paired's |",
             "|---|---|---|---|---|---|"]
    for v, runs in by_variant.items():
        finals = [final(r) for r in runs]
        tog = [sum(g["train_on_generated"] for g in r["generators"]) / len(r["generators"])
               for r in runs if r["generators"]]
        diffs = [f"{final(r) - other[v, r['seed']]:+.2f}" for r in runs if (v, r["seed"]) in other]
        lines.append(f"| {v} | {', '.join(str(r['seed']) for r in runs)} | {dgr.mean_sd(finals)} | "
                     f"{', '.join(f'{a:.2f}' for a in finals)} | {dgr.mean_sd(tog) if tog else ''} | "
                     f"{', '.join(diffs)} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", default="split", choices=("split", "permuted", "chain"))
    p.add_argument("--preset", default="fast", choices=("paper", "fast", "quick"))
    p.add_argument("--variants", default="gr,er,none")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed-start", type=int, default=0)
    p.add_argument("--budget", default="", help="Budget fields to override, as dgr.py's --budget")
    p.add_argument("--out", required=True)
    p.add_argument("--paired", default="", help="a folder of runs to compare with, seed by seed")
    args = p.parse_args()
    try:
        b = dataclasses.replace(dgr.PRESETS[args.preset][args.exp], **dgr.budget_overrides(args.budget))
    except (dgr.UsageError, ValueError) as e:
        p.error(str(e))
    data = {"mnist": load_digits()}
    os.makedirs(args.out, exist_ok=True)
    budget = json.loads(json.dumps(dataclasses.asdict(b)))   # as a JSON holds it: written, and compared
    settings = lambda variant, budget: dgr.run_settings({"exp": args.exp, "variant": variant, **budget})
    for variant in args.variants.split(","):
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            path = os.path.join(args.out, f"{variant}_seed{seed}.json")
            if os.path.exists(path):   # done, if it is a run of these settings
                with open(path) as f:
                    if settings(variant, json.load(f)["budget"]) != settings(variant, budget):
                        p.error(f"{path} is a run of other settings: one --out per --exp and --budget")
                continue
            start = time.time()
            res = dgr.run_one(dgr.EXPERIMENTS[args.exp], variant, seed, data, b)
            del res["samples"]
            run = {"data": "sklearn digits 8x8", "exp": args.exp, "variant": variant, "seed": seed,
                   "preset": args.preset, "budget_overrides": args.budget, "budget": budget, **res,
                   "wall_time_s": round(time.time() - start, 1), "threads": torch.get_num_threads(),
                   "machine": dgr.cpu_model(), "torch": torch.__version__}
            dgr.write_json(path, run)
            print(f"{variant} seed {seed}: {final(run):.2f} in {run['wall_time_s']:.0f} s", flush=True)
    print(table(args.out, args.paired))


if __name__ == "__main__":
    main()
