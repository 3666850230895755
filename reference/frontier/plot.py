#!/usr/bin/env python3
"""Draw the GR frontier figures from committed JSON only: no dgr import, no training, no timing.

    python reference/frontier/plot.py

writes reference/frontier/frontier.png (split MNIST) and frontier_permuted.png (permuted MNIST) from
  - reference/frontier/frontier.json: the seed-0 points of reference/frontier/run.sh (final average accuracy,
    wall time, machine) and the paper preset's projected cost on the same CPU (run.sh writes it);
  - reference/fast/<exp>/gr_seed*.json: the current fast preset's GR runs (a star: mean and sd over the seeds,
    its wall times' range as the horizontal bar);
  - for permuted, reference/paper-permuted-gan/preset/gr_seed*.json: the paper preset's GR runs on the same CPU.
x is the wall time of one run (the run's own clock, `wall_time_s`), y its final average accuracy. A point that
ran with one thread beside another run (its JSON's machine says "1 threads") is drawn hollow: its wall time is
not that of a run alone on the 2 cores. reference/README.md has every point's command and what it says.
"""
import glob
import io
import json
import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator  # noqa: E402
from PIL import Image  # noqa: E402  (matplotlib's own dependency)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# published numbers (theirs, not ours): label, value, colour, where the label sits on its line (left or right end)
PUBLISHED = {
    "split": [("van de Ven et al. DGR (VAE), published: 90.79 ± 0.41", 90.79, "tab:purple", "right"),
              ("van de Ven et al. RtF, published: 92.56", 92.56, "tab:brown", "left")],
    "permuted": [("van de Ven et al. DGR (VAE), published: 95.09", 95.09, "tab:purple", "left"),
                 ("van de Ven et al. DGR+distill, published: 97.35", 97.35, "tab:brown", "left")],
}
FIGS = {
    "split": dict(png="frontier.png",
                  title="GR on split MNIST (class-incremental, 5 tasks): accuracy against time per run\n"
                        "seed-0 points of reference/frontier/run.sh and the fast preset, 2 x86_64 CPU cores",
                  paper="paper preset (DCGAN, 3000 x 5 GAN steps),\nprojected on this CPU: {:.0f} min per run"),
    "permuted": dict(png="frontier_permuted.png",
                     title="GR on permuted MNIST (10 tasks, domain-incremental): accuracy against time per run\n"
                           "seed-0 points of reference/frontier/run.sh and the presets, 2 x86_64 CPU cores",
                     paper="paper preset before 2026-12-04 (DCGAN),\nprojected on this CPU: {:.0f} min per run"),
}
TICKS = [1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 40, 50, 70, 100, 150, 200, 300, 500]


def seeds(pattern):
    """mean and sd of the final average accuracy, and min/mean/max wall time (minutes), over the runs found"""
    runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(ROOT, pattern)))]
    if not runs:
        return None
    acc = [r["final"]["avg"] for r in runs]
    minutes = [r["wall_time_s"] / 60 for r in runs]
    return {"n": len(runs), "mean": statistics.mean(acc), "sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "acc": acc, "min": min(minutes), "mean_min": statistics.mean(minutes), "max": max(minutes),
            "threads": {r["machine"] for r in runs}}


def place_labels(fig, ax, pts, avoid):
    """number each point, offset so that no number overlaps another, a marker or the boxes in `avoid`"""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    px = fig.dpi / 72  # pixels per point
    markers = []
    for p in pts:
        x, y = ax.transData.transform((p["minutes"], p["avg"]))
        markers.append(matplotlib.transforms.Bbox([[x - 4 * px, y - 4 * px], [x + 4 * px, y + 4 * px]]))
    placed = list(avoid)
    # the most crowded points choose first
    def crowd(p):
        x, y = ax.transData.transform((p["minutes"], p["avg"]))
        return -sum(1 for m in markers if abs(m.x0 + 4 * px - x) < 30 * px and abs(m.y0 + 4 * px - y) < 15 * px)
    for p in sorted(pts, key=crowd):
        best = None
        for r in (6, 11, 17, 24, 32, 42):
            for deg in (0, 180, 30, 150, -30, -150, 60, 120, -60, -120, 90, -90):
                a = math.radians(deg)
                dx, dy = r * math.cos(a), r * math.sin(a)
                ha = "left" if dx > 1 else "right" if dx < -1 else "center"
                va = "bottom" if dy > 3 else "top" if dy < -3 else "center"
                t = ax.annotate(str(p["i"]), (p["minutes"], p["avg"]), xytext=(dx, dy), textcoords="offset points",
                                ha=ha, va=va, fontsize=7.5, fontweight="bold", color=p["colour"])
                bb = t.get_window_extent(renderer).expanded(1.15, 1.1)
                t.remove()
                inside = axbox.contains(bb.x0, bb.y0) and axbox.contains(bb.x1, bb.y1)
                if inside and not any(bb.overlaps(o) for o in placed + markers):
                    best = (dx, dy, ha, va, bb, r)
                    break
            if best:
                break
        if best is None:  # nowhere free: right of the point
            best = (6, 0, "left", "center", None, 6)
        dx, dy, ha, va, bb, r = best
        arrow = dict(arrowstyle="-", lw=0.5, color=p["colour"], shrinkA=0, shrinkB=3) if r > 11 else None
        ax.annotate(str(p["i"]), (p["minutes"], p["avg"]), xytext=(dx, dy), textcoords="offset points", ha=ha,
                    va=va, fontsize=7.5, fontweight="bold", color=p["colour"], arrowprops=arrow)
        if bb is not None:
            placed.append(bb)


def draw(exp, points, paper_minutes):
    cfg = FIGS[exp]
    pts = sorted((p for p in points if p["exp"] == exp), key=lambda p: (p["minutes"], p["name"]))
    for i, p in enumerate(pts, 1):
        p["i"] = i
        p["shared"] = p["machine"].endswith(" 1 threads")
        p["colour"] = "tab:blue" if p["variant"] == "gr" else "tab:orange"
    rows = math.ceil(len(pts) / 2) if len(pts) > 8 else len(pts)
    key_h = 0.3 + 0.12 * rows
    fig = plt.figure(figsize=(9.4, 5.0 + key_h))
    gs = fig.add_gridspec(2, 1, height_ratios=[5.0, key_h], hspace=0.22)
    ax = fig.add_subplot(gs[0])
    key = fig.add_subplot(gs[1])
    key.axis("off")

    for p in pts:
        ax.scatter(p["minutes"], p["avg"], marker="o" if p["variant"] == "gr" else "^", s=30, zorder=3,
                   facecolors="white" if p["shared"] else p["colour"], edgecolors=p["colour"], linewidths=1.2)
    # the current fast preset: mean and sd over its seeds, its wall times' range
    fast = seeds(f"reference/fast/{exp}/gr_seed*.json")
    handles = []
    if fast:
        h = ax.errorbar(fast["mean_min"], fast["mean"], yerr=fast["sd"],
                        xerr=[[fast["mean_min"] - fast["min"]], [fast["max"] - fast["mean_min"]]],
                        fmt="*", ms=15, color="tab:red", mec="black", mew=0.6, ecolor="tab:red", elinewidth=1.2,
                        capsize=3, zorder=4,
                        label=f"fast preset (current), GR, {fast['n']} seeds: {fast['mean']:.2f} ± {fast['sd']:.2f} %, "
                              f"{fast['min']:.1f}-{fast['max']:.1f} min per run"
                              + (" (one thread, beside another run)" if fast["threads"] == {"x86_64 CPU, 1 threads"}
                                 else ""))
        handles.append(h)
    paper = seeds("reference/paper-permuted-gan/preset/gr_seed*.json") if exp == "permuted" else None
    if paper:
        h = ax.errorbar(paper["mean_min"], paper["mean"], yerr=paper["sd"],
                        xerr=[[paper["mean_min"] - paper["min"]], [paper["max"] - paper["mean_min"]]],
                        fmt="D", ms=7, color="tab:green", mec="black", mew=0.6, elinewidth=1.2, capsize=3, zorder=4,
                        label=f"paper preset (current: fully connected GAN, 3000 x 5 steps), GR, {paper['n']} seeds: "
                              f"{paper['mean']:.2f} ± {paper['sd']:.2f} %,\n{paper['min']:.1f}-{paper['max']:.1f} "
                              "min per run (one thread, beside another run)")
        handles.append(h)
    handles += [
        ax.scatter([], [], marker="o", s=30, color="tab:blue", label="GR, seed 0, 2 threads, alone"),
        ax.scatter([], [], marker="o", s=30, facecolors="white", edgecolors="tab:blue", linewidths=1.2,
                   label="hollow: 1 thread, beside another run (time not a run alone)"),
        ax.scatter([], [], marker="^", s=30, color="tab:orange", label="GR+distill (soft targets, T = 2), seed 0"),
    ]
    # the axes hold every point, star, diamond and published line
    xs = [p["minutes"] for p in pts] + [s[k] for s in (fast, paper) if s for k in ("min", "max")]
    ys = ([p["avg"] for p in pts] + [s["mean"] + d * s["sd"] for s in (fast, paper) if s for d in (-1, 1)]
          + [v for _, v, _, _ in PUBLISHED[exp]])
    x0 = min(min(xs) / 1.15, max(t for t in TICKS if t <= min(xs)) / 1.02)  # down to a labelled tick
    x1 = max(xs) * 1.12
    y0, y1 = math.floor(min(ys) - 0.4), max(ys) + 0.9
    xticks = [t for t in TICKS if x0 <= t <= x1]
    # published numbers, labelled on their lines
    avoid = []
    for label, value, colour, end in PUBLISHED[exp]:
        ax.axhline(value, color=colour, ls="-.", lw=1, zorder=1)
        avoid.append(ax.text(x0 * 1.02 if end == "left" else x1 / 1.02, value + 0.06, label, color=colour,
                             fontsize=7, ha=end, va="bottom"))
    # the paper preset's projected cost lies far right of these runs
    avoid.append(ax.text(0.995, 0.02, cfg["paper"].format(paper_minutes) + " →", transform=ax.transAxes,
                         ha="right", va="bottom", fontsize=7, color="dimgrey"))
    ax.set_xscale("log")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.xaxis.set_major_locator(FixedLocator(xticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels([str(t) for t in xticks])
    ax.grid(True, which="major", color="0.92", zorder=0)
    ax.set_xlabel("wall time per run (minutes, log scale; 2 x86_64 CPU cores, torch 2.14.1)", fontsize=8.5)
    ax.set_ylabel("final average accuracy (%)", fontsize=8.5)
    ax.tick_params(labelsize=8)
    ax.set_title(cfg["title"], fontsize=9.5)
    leg = ax.legend(handles=handles, fontsize=6.8, loc="lower right", bbox_to_anchor=(1.0, 0.07),
                    framealpha=0.95, borderpad=0.5, handletextpad=0.4)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in avoid] + [leg.get_window_extent(renderer)]
    place_labels(fig, ax, pts, boxes)

    # the key: number, point (reference/frontier/<name>), variant, accuracy, wall time
    width = max(len(p["name"]) for p in pts) + 1

    def entry(p):
        return (f"{p['i']:>2} {p['name']:<{width}}{p['avg']:6.2f}{p['minutes']:6.1f}" + ("*" if p["shared"] else ""))
    cols = [pts[:rows], pts[rows:]] if rows < len(pts) else [pts]
    head = f"{'#':>2} {'reference/frontier/<name>':<{width}}{'acc %':>6}{'min':>6}"
    blocks = []
    for c, col in enumerate(cols):
        xpos = 0.0 + 0.52 * c
        key.text(xpos, 1.0, head, family="monospace", fontsize=6.4, va="top", ha="left", fontweight="bold",
                 transform=key.transAxes)
        blocks.append(key.annotate("\n".join(entry(p) for p in col), (xpos, 1.0), xycoords="axes fraction",
                                   xytext=(0, -10), textcoords="offset points", family="monospace", fontsize=6.4,
                                   va="top", ha="left", linespacing=1.25))
    key.annotate("Numbered points: seed 0, the paper preset plus the --budget of run.sh (names with 'distill' are "
                 "GR+distill); * one thread, beside another run.\nEach point's row, command and what it says: "
                 "reference/README.md, the frontier sections.", (0, 0), xycoords=blocks[0], xytext=(0, -5),
                 textcoords="offset points", fontsize=6.4, va="top", ha="left", color="dimgrey")
    fig.subplots_adjust(left=0.07, right=0.985, top=0.93, bottom=0.02)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", pad_inches=0.12)
    plt.close(fig)
    # a 256-colour palette keeps the file small (the figure has a few flat colours and anti-aliased text)
    Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(os.path.join(HERE, cfg["png"]), optimize=True)
    return os.path.join(HERE, cfg["png"])


def main():
    data = json.load(open(os.path.join(HERE, "frontier.json")))
    for exp in FIGS:
        print(draw(exp, [dict(p) for p in data["points"]], data["paper_preset_projected"][exp]["minutes"]))


if __name__ == "__main__":
    main()
