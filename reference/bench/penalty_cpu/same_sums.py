"""Are two builds of the CPU penalty kernel the same, bit for bit? Run once per build, then compare:

    python reference/bench/penalty_cpu/same_sums.py save /tmp/before.pt     # with the old build in place
    python reference/bench/penalty_cpu/same_sums.py save /tmp/after.pt      # after rebuilding
    python reference/bench/penalty_cpu/same_sums.py compare /tmp/before.pt /tmp/after.pt

Forward and backward of dgr::gradient_penalty on the CPU for fp32, fp64, fp16 and bf16, batches of
0, 1, 9, 13, 16, 64 and 67 rows, rows of 1, 5, 784, 785 and 3072 elements, zero rows and rows of norm > 1.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
import dgr  # noqa: E402

SHAPES = ((0, 784), (1, 784), (13, 785), (64, 1, 28, 28), (67, 3, 32, 32), (9, 5), (16, 1))


def outputs() -> list:
    dgr.load_extension(required=True)
    torch.manual_seed(0)
    out = []
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for shape in SHAPES:
            g = (torch.randn(*shape) * 0.05).to(dtype)
            g[::3] *= 40          # rows with norm > 1 too
            if len(g) > 5:
                g[5] = 0          # a zero row
            loss = torch.ops.dgr.gradient_penalty(g, 10.0)
            dg = torch.ops.dgr.gradient_penalty_backward(torch.tensor(0.7, dtype=dtype), g, 10.0)
            out.append((str(dtype), shape, loss, dg))
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["save"] and len(sys.argv) == 3:
        torch.save(outputs(), sys.argv[2])
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        a, b = torch.load(sys.argv[2]), torch.load(sys.argv[3])
        differ = [(x[0], x[1]) for x, y in zip(a, b) if not (torch.equal(x[2], y[2]) and torch.equal(x[3], y[3]))]
        print(f"{len(a)} cases, {len(differ)} differ" + (f": {differ}" if differ else ": bit for bit the same"))
        sys.exit(1 if differ else 0)
    else:
        sys.exit(__doc__)
