#!/usr/bin/env bash
# Every experiment of Shin et al. (2017), every variant, one seed:
#   bash reproduce.sh [--quick] [dgr.py options]
#   (default)  -> results/        the paper preset where CUDA is available, else the fast preset (README)
#   --quick    -> results-quick/  tiny budgets: a smoke test of a few minutes on a CPU, not a reproduction
# It prints the expected time of each experiment first. Started again, it continues killed runs and keeps
# finished ones (--resume); --overwrite starts afresh. Options go on to dgr.py: bash reproduce.sh --seeds 3
set -euo pipefail
cd "$(dirname "$0")"
preset=() out=results
if [[ "${1:-}" == "--quick" ]]; then preset=(--preset quick) out=results-quick; shift; fi
python -c "import torch, torchvision, scipy, matplotlib" 2>/dev/null \
    || python -m pip install -r requirements.txt
resume=(--resume)
for a in "$@"; do [[ "$a" == --overwrite ]] && resume=(); done
# Up to 4 runs at once, a process each (a permuted run holds about 3 GB): on a CPU each takes a share of the
# cores; on a GPU they share it, which overlaps best under CUDA MPS (nvidia-cuda-mps-control -d to start it,
# echo quit | nvidia-cuda-mps-control to stop it).
jobs=$(python -c "import os, torch; print(4 if torch.cuda.is_available() else min(4, os.cpu_count() or 1))")
exec python dgr.py --exp all "${preset[@]}" --out "$out" --jobs "$jobs" "${resume[@]}" "$@"
