#!/usr/bin/env bash
# Reproduce every experiment of Shin et al. (2017): bash reproduce.sh [--quick]
#   (default)    -> results/        paper preset where CUDA is available, else fast (budgets in README.md)
#   --quick      -> results-quick/  (tiny budgets, a few minutes on a CPU)
# Pass --preset paper (or fast) to choose yourself.
# Both folders are yours (git ignores them); the results committed with the project are in reference/.
# Extra arguments go to dgr.py, e.g. bash reproduce.sh --seeds 5
# A killed run continues where it stopped when started again (--resume); finished runs are kept.
# To start afresh: bash reproduce.sh --overwrite
set -euo pipefail
cd "$(dirname "$0")"
preset=() out=results
if [[ "${1:-}" == "--quick" ]]; then preset=(--preset quick) out=results-quick; shift; fi
python -c "import torch, torchvision, scipy, matplotlib" 2>/dev/null || python -m pip install -r requirements.txt
resume=--resume prev=
for a in "$@"; do   # --overwrite drops --resume; --out moves the folder summarised at the end
  [[ "$a" == --overwrite ]] && resume=
  [[ "$prev" == --out ]] && out="$a"
  [[ "$a" == --out=* ]] && out="${a#--out=}"
  prev="$a"
done
# Runs go side by side, a process each, up to 4 (a permuted run holds ~3 GB). Without CUDA each takes a
# share of the cores: small networks use two cores poorly, so two 1-thread runs do ~1.5x the work of one.
# With CUDA they share the GPU, overlapping kernels that leave part of it idle: the MNIST experiments took
# 3m58s this way on an H200 under CUDA MPS (2026-12-04), against 8m39s expected one after another (README). Without MPS the
# GPU time-slices the processes (five short runs at once took 3.1x one); start MPS first for more:
#   nvidia-cuda-mps-control -d     (stop it afterwards: echo quit | nvidia-cuda-mps-control)
jobs=$(python -c "import os, torch; print(4 if torch.cuda.is_available() else min(4, os.cpu_count() or 1))")
echo "== expected time (step costs timed on this machine) =="
python dgr.py --exp all "${preset[@]}" --out "$out" --estimate --jobs "$jobs" $resume "$@"
failed=()
if (( jobs > 1 )); then
  echo "== every experiment, up to $jobs runs at once =="
  python dgr.py --exp all "${preset[@]}" --out "$out" --jobs "$jobs" $resume "$@" || failed+=("some runs")
else
  for exp in chain permuted split mnist-svhn svhn-mnist lwf; do
    echo "== $exp =="
    python dgr.py --exp "$exp" "${preset[@]}" --out "$out" $resume "$@" || failed+=("$exp")
  done
fi
cat "$out"/*/summary.md > "$out/summary.md" 2>/dev/null || true
echo "results (JSON per run), figures (PNG) and summary.md per experiment are in $out/"
if (( ${#failed[@]} )); then
  echo "failed: ${failed[*]} (the messages are above; SVHN must be in \$DGR_DATA/SVHN when offline)" >&2
  exit 1
fi
