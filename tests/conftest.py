"""Shared helpers: the real MNIST, small SVHN-format .mat files, running dgr.py in a subprocess.

MNIST comes from $DGR_DATA, else from the project's default data folder (./data), where torchvision
downloads it if it is missing; CI points DGR_DATA at ../shared/data."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # tests import dgr.py from the checkout
DATA = os.path.abspath(os.environ.get("DGR_DATA") or os.path.join(ROOT, "data"))
PATCHED = os.path.join(ROOT, "tests", "patched_dgr.py")


def run_dgr(*args, data_dir=None, patches=(), timeout=600, script="dgr.py", threads=None):
    """Run the real CLI (or another script of the checkout) in a subprocess, through tests/patched_dgr.py
    when `patches` are named, with `threads` CPU threads if given; return the CompletedProcess (text
    output)."""
    cmd = [sys.executable, PATCHED] if patches else [sys.executable, script]
    env = {**os.environ, "DGR_DATA": data_dir or DATA, "PYTHONUNBUFFERED": "1",
           "DGR_TEST_PATCHES": ",".join(patches)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run(cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


_mnist = {}


def require_mnist():
    """The real MNIST under DATA: found there, or downloaded by torchvision; else one clear failure."""
    if "error" not in _mnist:
        import dgr
        import torch
        try:   # as dgr.py gets it: found, else downloaded, else a DataError that names folder and files
            dgr.load_mnist(DATA, torch.device("cpu"))
            _mnist["error"] = None
        except dgr.DataError as e:
            _mnist["error"] = str(e)
    if _mnist["error"]:
        pytest.fail(f"real MNIST needed: {_mnist['error']}")


def write_fake_svhn(root, n_train=800, n_test=400, seed=0):
    """SVHN-format .mat files (X: 32x32x3xN uint8, y: Nx1 with labels 1..10, 10 meaning digit 0) made
    of real MNIST digits coloured on noisy backgrounds, so that a solver can learn them."""
    import numpy as np
    import scipy.io
    import torch
    from torchvision.datasets import MNIST
    rng = np.random.default_rng(seed)
    mnist = MNIST(DATA, train=True, download=False)
    os.makedirs(os.path.join(root, "SVHN"), exist_ok=True)
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        idx = rng.choice(len(mnist.data), n, replace=False)
        digits = torch.nn.functional.pad(mnist.data[idx], (2, 2, 2, 2)).numpy().astype(np.float32) / 255.0
        fg, bg = rng.uniform(0, 255, (n, 1, 1, 3)), rng.uniform(0, 255, (n, 1, 1, 3))
        img = digits[..., None] * fg + (1 - digits[..., None]) * bg + rng.normal(0, 10, (n, 32, 32, 3))
        labels = mnist.targets[idx].numpy()
        scipy.io.savemat(os.path.join(root, "SVHN", name), {
            "X": np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 3, 0),
            "y": np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]})
    return root


@pytest.fixture(scope="session")
def svhn_data_dir(tmp_path_factory):
    """A data root with the real MNIST (linked) and small SVHN-format files."""
    require_mnist()
    root = tmp_path_factory.mktemp("data")
    os.symlink(os.path.join(DATA, "MNIST"), os.path.join(root, "MNIST"))
    return str(write_fake_svhn(str(root)))
