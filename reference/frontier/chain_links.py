"""Where the GR chain (Table 1) loses accuracy: in the generators re-learnt link after link, or in the labels.

One chain run of dgr.py (its options, e.g. --preset fast --variants gr), with one change. With
--generator first, links 2-5 all replay the first link's generator, trained once on real MNIST and never
re-learnt from samples: every link after the first learns from inputs of one distribution, labelled as
in GR by the previous link's solver. The plain chain (dgr.py, or --generator previous here) replays a
generator that each link re-learnt from its predecessor's samples. What the first-generator run loses
after link 2 is the labels' share (each solver learns the previous one's answers); what the plain chain
loses beyond it is the re-learnt generators' share.

  python reference/frontier/chain_links.py --preset fast --variants gr --out reference/frontier/chain-links
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import dgr  # noqa: E402
from sample_quality import prepare, write_report  # noqa: E402  (this script's folder is on sys.path when run)


def replay_first_generator() -> None:
    """Links after the first replay link 1's generator and train none of their own."""
    first = {}
    make_replay, run_plan = dgr.make_replay, dgr.run_plan

    def replay_from_first(v, exp, args, old, pool, head, ewc):
        if old is not None:   # link 2's old scholar is link 1's: keep its generator for every later link
            old.generator = first.setdefault("generator", old.generator)
        return make_replay(v, exp, args, old, pool, head, ewc)

    def plan_without_later_generators(exp, v, b):
        return [plan if i == 0 else {kind: n for kind, n in plan.items() if "generator" not in kind}
                for i, plan in enumerate(run_plan(exp, v, b))]
    dgr.make_replay, dgr.run_plan = replay_from_first, plan_without_later_generators


def main() -> int:
    own = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="every other option is dgr.py's (python dgr.py --help); --exp is chain")
    own.add_argument("--generator", choices=("first", "previous"), default="first",
                     help="what links 2-5 replay: link 1's generator (first) or the previous link's (previous: "
                          "the plain chain, each link's generator re-learnt from its predecessor's samples)")
    own.add_argument("--seed", type=int, default=0, help="the run's seed")
    mine, rest = own.parse_known_args()

    def check(args):
        if args.variants not in dgr.VARIANTS or not dgr.VARIANTS[args.variants].generative:
            raise dgr.UsageError(f"--variants takes one generative variant (gr or gr+distill), got {args.variants}")
    prepared = prepare("chain_links.py", "chain", rest, check)
    if prepared is None:
        return 2
    args, device, data, b = prepared
    variant = args.variants
    if mine.generator == "first":
        replay_first_generator()

    def on_step(run, task, phase, step, info):
        if "acc" in info:
            print(f"link {run.stage + 1} solver step {step}: accuracy {info['acc'][0]:.2f} "
                  f"({time.time() - started:.0f} s)", flush=True)

    started = time.time()
    result = dgr.run_one("chain", variant, mine.seed, args, data, b, on_step=on_step)
    wall = time.time() - started
    acc = result["final"]["acc"]
    print(f"{variant}, generator {mine.generator}: solvers {' '.join(f'{a:.2f}' for a in acc)} in {wall:.0f} s",
          flush=True)
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, f"chain_links_{variant}_{mine.generator}_seed{mine.seed}.json")
    trained = sum(dgr.trains_generator(plan) for plan in dgr.run_plan("chain", dgr.VARIANTS[variant], b))
    write_report(out, {"variant": variant, "generator": mine.generator, "seed": mine.seed, "acc": acc,
                       "generators_trained": trained}, wall, device, b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
