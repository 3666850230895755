#!/usr/bin/env bash
# The accuracy-vs-compute frontier of GR on a CPU, seed 0: split MNIST (class-incremental), and permuted
# MNIST (points named permuted-*), and chain (chain-*: each link's accuracy).
#   bash reference/frontier/run.sh [NAME ...]   # the points named (default: all), one after another
# Each point is one dgr.py run (paper preset plus --budget overrides) into reference/frontier/NAME/;
# a finished point is kept (--resume). Run it on an otherwise idle machine: the wall times are the x axis.
# Then frontier.json (all points) is made from the points' results, and reference/frontier/plot.py draws one figure
# per experiment from it (frontier.png: split; frontier_permuted.png; chain's points, one accuracy per link, are in
# frontier.json and reference/README.md only); plot.py alone redraws them from the committed JSON.
# The committed points' run folders are not in the tree (git has them, at 456730b): frontier.json keeps each point's
# numbers, settings and note, and a point whose folder is absent keeps its entry there.
set -euo pipefail
cd "$(dirname "$0")/../.."
declare -A POINTS=(
  # name                       budget overrides (Budget fields; the paper preset's otherwise)
  [mlp256-g800-s1000]="gan=mlp,width=256,gen_iters=800,gen_lr=2e-4,solver_iters=1000"
  [mlp256-g1500-s2000]="gan=mlp,width=256,gen_iters=1500,gen_lr=2e-4"
  [mlp128-g1500-s1000]="gan=mlp,width=128,gen_iters=1500,gen_lr=2e-4,solver_iters=1000"
  [mlp128-g800-c3-s1000]="gan=mlp,width=128,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000"
  [mlp128-g800-c3-s500]="gan=mlp,width=128,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=500"
  [mlp128-g800-c3-s1000-lr3e-4]="gan=mlp,width=128,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000,solver_lr=3e-4"
  [mlp128-g800-c3-s1000-lr1e-4]="gan=mlp,width=128,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000,solver_lr=1e-4"
  [mlp128-g800-c3-s2000-lr3e-4]="gan=mlp,width=128,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=2000,solver_lr=3e-4"
  [mlp128-g800-c3-s1000-distill]="gan=mlp,width=128,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000"
  [mlp128-g800-c3-s1000-lr3e-4-cos]="gan=mlp,width=128,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000,solver_lr=3e-4,solver_schedule=cosine"
  [mlp128-g800-c3-s1000-lr1e-3-cos]="gan=mlp,width=128,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000,solver_lr=1e-3,solver_schedule=cosine"
  [mlp128-g800-c3-s2000-lr3e-4-cos]="gan=mlp,width=128,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=2000,solver_lr=3e-4,solver_schedule=cosine"
  [mlp128-g800-c3-s750-lr3e-4-cos]="gan=mlp,width=128,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=750,solver_lr=3e-4,solver_schedule=cosine"
  [mlp128-g800-c3-s1000-lr5e-4-cos]="gan=mlp,width=128,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000,solver_lr=5e-4,solver_schedule=cosine"
  [mlp256-g800-c3-s1000-lr3e-4-cos]="gan=mlp,width=256,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000,solver_lr=3e-4,solver_schedule=cosine"
  [mlp128-g800-c3-s1000-lr3e-4-cos-distill]="gan=mlp,width=128,gen_iters=800,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000,solver_lr=3e-4,solver_schedule=cosine"
  [mlp128-g1500-c3-s1000-lr3e-4-cos]="gan=mlp,width=128,gen_iters=1500,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000,solver_lr=3e-4,solver_schedule=cosine"
  # the fast GAN with the paper preset's 2000 solver steps: its constant lr 1e-3, then the cosine levers
  [mlp128-g1500-c3-s2000-lr1e-3]="gan=mlp,width=128,gen_iters=1500,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=2000,solver_lr=1e-3"
  [mlp128-g1500-c3-s2000-lr1e-3-cos]="gan=mlp,width=128,gen_iters=1500,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=2000,solver_lr=1e-3,solver_schedule=cosine"
  [mlp128-g1500-c3-s2000-lr3e-4-cos]="gan=mlp,width=128,gen_iters=1500,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=2000,solver_lr=3e-4,solver_schedule=cosine"
  # the fast point with a GAN trained twice as long, or twice as wide
  [mlp128-g3000-c3-s1000-lr3e-4-cos]="gan=mlp,width=128,gen_iters=3000,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000,solver_lr=3e-4,solver_schedule=cosine"
  [mlp256-g1500-c3-s1000-lr3e-4-cos]="gan=mlp,width=256,gen_iters=1500,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000,solver_lr=3e-4,solver_schedule=cosine"
  # the fast point with a regularised solver: dropout, or a wider solver with more dropout
  [mlp128-g1500-c3-s1000-lr3e-4-cos-drop0.2]="gan=mlp,width=128,gen_iters=1500,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000,solver_lr=3e-4,solver_schedule=cosine,dropout=0.2"
  [mlp128-g1500-c3-s1000-lr3e-4-cos-h1000-drop0.3]="gan=mlp,width=128,gen_iters=1500,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=1000,solver_lr=3e-4,solver_schedule=cosine,hidden=1000,dropout=0.3"
  # permuted MNIST, 10 tasks. The point permuted-mlp128-g800-s5000 (the former fast budget) is not run here:
  # it is the GR run of reproduce.sh at commit a449b76 (then in reference/fast/reproduce/permuted), copied; its --preset is fast.
  [permuted-mlp256-g3000-s2500]="gan=mlp,width=256,gen_iters=3000,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=2500,solver_schedule=cosine"
  [permuted-mlp256-g3000-s5000]="gan=mlp,width=256,gen_iters=3000,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_schedule=cosine"
  [permuted-mlp256-g3000-s2500-distill]="gan=mlp,width=256,gen_iters=3000,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_iters=2500,solver_schedule=cosine"
  # the permuted fast preset of 2026-11-28 (gen_ema=0.99, GAN batch 64) with one change: the solver's lr 3e-4 (the noise of hard
  # labels on generated inputs averaged over more steps), or the GAN's batch 128 (its samples; the preset since 2026-12-03), ...
  [permuted-mlp256-g3000-s5000-ema-lr3e-4]="gan=mlp,width=256,gen_iters=3000,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_schedule=cosine,gen_ema=0.99,solver_lr=3e-4"
  [permuted-mlp256-g3000-s5000-ema-gb128]="gan=mlp,width=256,gen_iters=3000,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_schedule=cosine,gen_ema=0.99,gen_batch=128"
  # ... or a solver of van de Ven et al.'s width (784-1000-1000-10: the capacity to fit the old solver's argmax)
  [permuted-mlp256-g3000-s5000-ema-h1000]="gan=mlp,width=256,gen_iters=3000,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_schedule=cosine,gen_ema=0.99,hidden=1000"
  # chain (Table 1), 5 links: the fast preset's GAN (width 256, 3000 steps) twice as wide, or trained twice as long.
  # The point chain-mlp256-g3000 (the fast budget) is not run here: it is the GR run of reproduce.sh at commit 59324be
  # (reference/fast/chain-replay_batch=0/gr_seed0.json, one thread beside another run), copied; its --preset is fast.
  [chain-mlp512-g3000]="gan=mlp,width=512,gen_iters=3000,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_schedule=cosine"
  [chain-mlp256-g6000]="gan=mlp,width=256,gen_iters=6000,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_schedule=cosine"
  [chain-mlp512-g3000-distill]="gan=mlp,width=512,gen_iters=3000,n_critic=3,gen_lr=2e-4,critic_lr=4e-4,solver_schedule=cosine"
)
# the variant of each point: gr unless named here (gr+distill: soft targets at T = 2)
declare -A VARIANT=([mlp128-g800-c3-s1000-distill]="gr+distill" [mlp128-g800-c3-s1000-lr3e-4-cos-distill]="gr+distill"
  [permuted-mlp256-g3000-s2500-distill]="gr+distill" [chain-mlp512-g3000-distill]="gr+distill")
names=("$@"); (( ${#names[@]} )) || names=($(printf '%s\n' "${!POINTS[@]}" | sort))
for name in "${names[@]}"; do
  exp=split; [[ $name == permuted-* ]] && exp=permuted; [[ $name == chain-* ]] && exp=chain
  echo "== $name: ${POINTS[$name]} (load before: $(cut -d' ' -f1-3 /proc/loadavg)) =="
  python dgr.py --exp "$exp" --variants "${VARIANT[$name]:-gr}" --preset paper --budget "${POINTS[$name]}" \
    --out "reference/frontier/$name" --resume
done
python - <<'PY'
import glob, json, os, statistics
import dgr
old = json.load(open("reference/frontier/frontier.json")) if os.path.exists("reference/frontier/frontier.json") else {}
points = {}
for path in sorted(glob.glob("reference/frontier/*/*/gr*_seed0.json")):
    res = json.load(open(path))
    name, args, folder = path.split("/")[2], res["config"]["args"], os.path.dirname(os.path.dirname(path))
    p = {"name": name, "exp": res["exp"], "variant": res["variant"], "avg": res["final"]["avg"],
         "acc": res["final"]["acc"], "minutes": res["wall_time_s"] / 60, "machine": res["machine"],
         "budget": res["config"]["budget"], "seed": res["seed"], "preset": args["preset"],
         "budget_override": args["budget"], "wall_time_s": res["wall_time_s"]}
    if res["exp"] != "chain":   # each task's accuracy right after it was learnt, mean over tasks
        m = res["acc_after_task"]
        p["learnt"] = statistics.mean(m[i][i] for i in range(len(m)))
    if res.get("note"):
        p["note"] = res["note"]
    p["files"] = sorted(os.path.relpath(f, folder) for f in glob.glob(folder + "/**/*", recursive=True) if os.path.isfile(f))
    points[name, res["variant"]] = p
# a point whose run folder is not here (the committed points: in git) keeps its entry of frontier.json
for p in old.get("points", []):
    points.setdefault((p["name"], p["variant"]), p)
points = [points[k] for k in sorted(points, key=lambda k: f"{k[0]}/{points[k]['exp']}/{k[1]}_seed0.json")]
# the paper preset's cost, projected from its step costs timed here once (it takes hours on a CPU);
# delete frontier.json to time them again, on an idle machine
paper = old.get("paper_preset_projected", {})
for exp in ("split", "permuted"):
    if exp not in paper:
        e, b = dgr.EXPERIMENTS[exp], dgr.PAPER[exp]
        costs = dgr.step_costs(e, b, dgr.torch.device("cpu"))
        seconds = dgr.run_seconds(e, "gr", b, costs)
        paper[exp] = {"minutes": seconds / 60, "step_costs_s": costs, "machine": dgr.machine_name(dgr.torch.device("cpu"))}
about = {"about": old["about"]} if "about" in old else {}
dgr.write_json("reference/frontier/frontier.json", {**about, "points": points, "paper_preset_projected": paper})
print(json.dumps({p["name"]: round(p["avg"], 2) for p in points}, indent=1))
PY
# the figures, from frontier.json and the committed preset runs only
python reference/frontier/plot.py
