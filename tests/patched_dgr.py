"""dgr.py's command line with test-only patches, named (comma-separated) in $DGR_TEST_PATCHES:

    svhn-md5                 accept SVHN files whatever their md5 (the tests' small SVHN-format files);
                             torchvision's real loading path (scipy.io, label 10 -> 0) stays under test
    offline                  every dataset download goes to a local port that refuses connections, so a
                             missing dataset fails to download the same way with or without internet
    kill-at=STAGE:PHASE:STEP the process SIGKILLs itself right after saving the checkpoint at that
                             position (0-based task or link, phase 'solver' or 'generator', step)

Usage: DGR_TEST_PATCHES=offline python tests/patched_dgr.py --exp split ...
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dgr  # noqa: E402

REFUSED = "http://127.0.0.1:9/"   # the discard port: nothing listens there


def patch(name: str) -> None:
    from torchvision.datasets import MNIST, SVHN
    if name == "svhn-md5":
        SVHN._check_integrity = lambda self: True
    elif name == "offline":
        MNIST.mirrors = [REFUSED]
        SVHN.split_list = {split: [REFUSED + file, file, md5]
                           for split, (_, file, md5) in SVHN.split_list.items()}
    elif name.startswith("kill-at="):
        stage, phase, step = name.split("=", 1)[1].split(":")
        target, save = f"task {int(stage) + 1}, {phase} step {step}", dgr.Checkpoint.save

        def save_then_die(self, run, b):
            save(self, run, b)
            if dgr.position(run.stage, run.step, b) == target:
                os.kill(os.getpid(), signal.SIGKILL)
        dgr.Checkpoint.save = save_then_die
    else:
        raise SystemExit(f"patched_dgr.py: unknown patch {name!r}")


if __name__ == "__main__":
    dgr.RUN_COMMAND = [sys.executable, os.path.abspath(__file__)]   # --jobs: every run gets the patches too
    for name in filter(None, os.environ.get("DGR_TEST_PATCHES", "").split(",")):
        patch(name)
    sys.exit(dgr.main(sys.argv[1:]))
