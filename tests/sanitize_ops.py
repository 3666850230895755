"""Every CUDA kernel of the dgr ops once, small, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck python tests/sanitize_ops.py

Each dtype; row lengths with and without 16-byte packs; a misaligned view; an empty batch; hard and
soft targets with 10 and 40 classes; forward and backward. Prints one line per case; exits 0 when all
ran (the sanitizer reports what it found on its own)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dgr  # noqa: E402


def main() -> None:
    assert torch.cuda.is_available(), "a CUDA device is needed"
    dgr.load_extension(required=True)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for name, g in (("B=5 D=784", torch.randn(5, 1, 28, 28)), ("B=3 D=785", torch.randn(3, 785)),
                        ("misaligned", torch.randn(4 * 784 + 1)[1:].view(4, 784)),
                        ("B=0", torch.randn(0, 784))):
            g = g.cuda().to(dtype).requires_grad_(True)
            loss = torch.ops.dgr.gradient_penalty(g, 10.0)
            grad, = torch.autograd.grad(loss, g)
            torch.cuda.synchronize()
            print(f"gradient_penalty {dtype} {name}: loss {float(loss):.4g}, "
                  f"|grad| {float(grad.abs().sum()):.4g}")
        for classes in (10, 40):
            for soft in (False, True):
                lr = torch.randn(6, classes, device="cuda", dtype=dtype, requires_grad=True)
                lp = torch.randn(5, classes, device="cuda", dtype=dtype, requires_grad=True)
                y = torch.randint(classes, (6,), device="cuda")
                t = (torch.randn(5, classes, device="cuda").softmax(1).to(dtype) if soft
                     else torch.randint(classes, (5,), device="cuda"))
                loss = torch.ops.dgr.replay_loss_fwd(lr, y, lp, t, 0.3)[0]
                grads = torch.autograd.grad(loss, (lr, lp))
                torch.cuda.synchronize()
                print(f"replay_loss {dtype} C={classes} soft={soft}: loss {float(loss):.4g}, "
                      f"|grad| {float(sum(g.abs().sum() for g in grads)):.4g}")


if __name__ == "__main__":
    main()
