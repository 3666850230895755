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
resume=--resume; for a in "$@"; do [[ "$a" == --overwrite ]] && resume=; done
echo "== expected time (step costs timed on this machine) =="
python dgr.py --exp all "${preset[@]}" --out "$out" --estimate $resume "$@"
failed=()
for exp in chain permuted split mnist-svhn svhn-mnist lwf; do
  echo "== $exp =="
  python dgr.py --exp "$exp" "${preset[@]}" --out "$out" $resume "$@" || failed+=("$exp")
done
cat "$out"/*/summary.md > "$out/summary.md" 2>/dev/null || true
echo "results (JSON per run), figures (PNG) and summary.md per experiment are in $out/"
if (( ${#failed[@]} )); then
  echo "failed: ${failed[*]} (see the message above each; SVHN must be in \$DGR_DATA/SVHN when offline)" >&2
  exit 1
fi
