"""Which bad inputs raise a clean RuntimeError and which crash the process, each in its own subprocess.

    python .ci/crash_map.py [--root DIR]     # DIR holds the dgr.py and dgr_ops build to test (default: .)
    python .ci/crash_map.py --code NAME      # print one case's program (for a debugger), run nothing

A build against a static libstdc++ can crash the process on a C++ throw instead of raising (the history
is in reference/README.md, "The GPU check"). The cases differ in what their message streams (text only, a
dtype, integers, sizes) and in where they throw (dgr_ops, or PyTorch itself as a control), so the map says
which throws crash. Prints one line per case; exit 0 whatever it finds (.ci/gpu-check reads the lines).
"""
import argparse
import os
import subprocess
import sys

SETUP = ("import torch, dgr; dgr.load_extension(required=True); x = torch.randn(4, 10); "
         "y = torch.zeros(4, dtype=torch.long)\n")
CASES = {   # name: (what the message streams, the call)
    "penalty of a 0-d tensor": ("text", "torch.ops.dgr.gradient_penalty(torch.tensor(1.0), 1.0)"),
    "penalty of int64": ("a dtype", "torch.ops.dgr.gradient_penalty(y.view(2, 2), 1.0)"),
    "replay, 10 vs 5 classes": ("integers", "torch.ops.dgr.replay_loss_fwd(x, y, x[:, :5], y, 0.5)"),
    "replay, 1-d logits": ("sizes", "torch.ops.dgr.replay_loss_fwd(x[0], y, x[0], y, 0.5)"),
    "replay, 3 labels for 4 rows": ("integers, a dtype, sizes",
                                    "torch.ops.dgr.replay_loss_fwd(x, y[:3], x, y, 0.5)"),
    "replay, 0 classes": ("text", "torch.ops.dgr.replay_loss_fwd(x[:, :0], y, x[:, :0], y, 0.5)"),
    "replay, label 10 of 10 (in parallel_for)": (
        "integers", "torch.ops.dgr.replay_loss_fwd(x, y + 10, x[:0], y[:0], 1.0)"),
    "control: PyTorch's own size check": ("sizes", "torch.zeros(3) + torch.zeros(4)"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="folder with dgr.py and its dgr_ops build")
    parser.add_argument("--code", choices=CASES, help="print this case's program and exit")
    args = parser.parse_args()
    if args.code:
        print(SETUP + CASES[args.code][1])
        return
    root = os.path.abspath(args.root)
    print(f"bad inputs, {root}:")
    for name, (streams, call) in CASES.items():
        code = SETUP + (f"try:\n    {call}\n    print('no error')\nexcept RuntimeError as e:\n"
                        "    print('raised: ' + str(e).splitlines()[0][:90])\n")
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                              timeout=120)
        lines = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
        said = lines[-1] if lines else ""
        outcome = said if proc.returncode == 0 else f"CRASHED (exit {proc.returncode}): {said}"
        print(f"  {name:42s} [{streams}]: {outcome}")


if __name__ == "__main__":
    main()
