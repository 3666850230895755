"""Benchmark of dgr.py's two losses and whole training steps: PyTorch reference vs fused op, side by side.

    python tests/bench_ops.py [--device cuda] [--quick] [--out reference]

Each loss forward + backward runs as the eager reference, torch.compile of the reference (not with
--quick) and the fused op; each whole step (WGAN-GP critic step at width 64, and as a control the
same step with its three inputs in one batch, as it was before; generator step; solver step with GR
replay; the critic and generator steps under bf16 autocast, a lever (--budget gan_precision=bf16); each
with its Adam step as dgr.py builds it) runs with impl torch and impl ext,
and on CUDA also captured as one CUDA graph (the GAN's convolutions channels_last, as dgr.py has them,
then NCHW), with its kernels and their GPU time (profiler); Adam alone on the critic's weights
runs as PyTorch's default, fused, and graphed. On CUDA the penalty is also timed as GPU time at 25M
elements, beside a copy of as many bytes, and, last, a lever not in dgr.py: the critic step with the
interpolates' branch on a side stream (checked against critic_step's weights, then timed). Medians of
repeated runs; ratios are eager time / time.
Prints a Markdown table row by row and writes <out>/bench/bench.json and bench.md after each row.
"""
import argparse
import copy
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dgr  # noqa: E402


def time_ms(fn, device, reps: int) -> float:
    """Median wall time of fn() in ms, after warm-up; CUDA timed with events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def time_interleaved(fns: dict, rounds: int, per_round: int) -> dict:
    """Wall times in ms of each fns[name]() on the CPU, interleaved so that the machine's drift touches all
    alike: 3 warm-up calls of each, then `rounds` rounds of `per_round` calls of each in turn."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(1e3 * (time.perf_counter() - t0))
    return times


def captured(fn, device):
    """fn as dgr's whole-step CUDA graph (what --graphs on does: three eager warm-up calls on a side
    stream, then captured once and replayed)."""
    return dgr.graphed(fn, device)


def graph_replay_ms(fn, device, reps: int, per_graph: int = 10) -> float:
    """GPU time of fn() in ms without launch overhead: `per_graph` calls captured in one CUDA graph, the
    graph's replays timed with events; median of reps, per call."""
    graph = captured(lambda: [fn() for _ in range(per_graph)], device)
    graph()   # eager warm-up 1 of 3; time_ms warms up twice more and captures
    return time_ms(graph, device, reps) / per_graph


def bench_losses(device, batches, with_compile: bool, reps: int, report) -> None:
    """Forward + backward of each loss: eager reference, torch.compile of the reference, fused op. On CUDA
    (not --quick) the penalty also at B = 8192 x 3x32x32 (25M elements), timed twice: as above, and as GPU
    time by CUDA graph replay (no launch overhead: the kernels' own time), beside a copy of the same
    bytes (what the card's memory can do here); GB/s counts the fewest bytes the op must move."""
    for shape in ((1, 28, 28), (3, 32, 32)):
        big = (8192,) if device.type == "cuda" and len(batches) > 1 and shape == (3, 32, 32) else ()
        for n in (*batches, *big):
            g = (torch.randn(n, *shape, device=device) * 0.03).requires_grad_(True)
            lr, lp = (torch.randn(n, 10, device=device, requires_grad=True),
                      torch.randn(n, 10, device=device, requires_grad=True))
            y, t = torch.randint(10, (n,), device=device), torch.randn(n, 10, device=device).softmax(1)
            cases = {"gradient_penalty": (lambda f: torch.autograd.grad(f(g, 10.0), g),
                                          dgr.gradient_penalty_ref,
                                          lambda x, lam: torch.ops.dgr.gradient_penalty(x, lam)),
                     "replay_loss": (lambda f: torch.autograd.grad(f(lr, y, lp, t, 0.5), (lr, lp)),
                                     dgr.replay_loss_ref,
                                     lambda *a: torch.ops.dgr.replay_loss_fwd(*a)[0])}
            for op, (run, ref, fused) in cases.items():
                if op == "replay_loss" and shape != (1, 28, 28):
                    continue   # the replay loss sees logits only: one row per batch size
                row = {"op": op,
                       "shape": "x".join(map(str, shape)) if op == "gradient_penalty" else "10 classes",
                       "batch": n, "eager_ms": time_ms(lambda: run(ref), device, reps)}
                if with_compile:
                    # a fresh compile per row, never the recompile limit's eager fallback
                    torch._dynamo.reset()
                    compiled = torch.compile(ref, dynamic=False)
                    row["compiled_ms"] = time_ms(lambda: run(compiled), device, reps)
                row["fused_ms"] = time_ms(lambda: run(fused), device, reps)
                # fewest bytes: read g (forward), read g and write dg (backward)
                if op == "gradient_penalty":
                    row["fused_GBps"] = 3 * g.numel() * g.element_size() / (row["fused_ms"] * 1e6)
                report(row)
                if n in big and op == "gradient_penalty":
                    bench_gpu_time(g, run, ref, compiled if with_compile else None, fused, device, reps,
                                   report)


def bench_gpu_time(g, run, ref, compiled, fused, device, reps: int, report) -> None:
    """The penalty's forward + backward as GPU time (graph replay), and a copy of g for reference."""
    shape, n, nbytes = "x".join(map(str, g.shape[1:])), len(g), g.numel() * g.element_size()
    src, dst = g.detach().clone(), torch.empty_like(g)
    copy = {"op": "copy (read + write g)", "shape": shape, "batch": n,
            "eager_ms": graph_replay_ms(lambda: dst.copy_(src), device, reps)}
    copy["fused_GBps"] = 2 * nbytes / (copy["eager_ms"] * 1e6)
    row = {"op": "gradient_penalty, GPU time", "shape": shape, "batch": n,
           "eager_ms": graph_replay_ms(lambda: run(ref), device, reps),
           "fused_ms": graph_replay_ms(lambda: run(fused), device, reps)}
    if compiled is not None:
        try:
            row["compiled_ms"] = graph_replay_ms(lambda: run(compiled), device, reps)
        except Exception as e:   # inductor's code may not capture; say so and go on
            print(f"compiled penalty not captured in a CUDA graph: {type(e).__name__}: {e}", flush=True)
    row["fused_GBps"] = 3 * nbytes / (row["fused_ms"] * 1e6)
    report(copy)
    report(row)


def kernel_profile(fn, reps: int = 10) -> dict:
    """Per call of fn (eager, CUDA): the device activities launched (kernels, copies, fills) and their
    summed GPU time, from the profiler, and the three costliest kernels. Beside the graphed time it says
    what bounds a step: launches (graphed << eager) or the kernels themselves (graphed ~ GPU time)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = {}
    for e in device_events:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:3]
    return {"kernels": len(device_events) / reps, "kernel_ms": sum(by_name.values()) / reps / 1e3,
            "top_kernels": [(name[:80], us / reps / 1e3) for name, us in top]}


def critic_step_one_batch(s: dgr.Scholar, opt, x_real: torch.Tensor, lam: float) -> torch.Tensor:
    """dgr.critic_step as it was before the split step: real, fake and interpolated inputs in one batch of 3n
    rows, so the penalty's input gradient and double backward ran over all 3n. The benchmark's control
    for the split step; tests/test_method.py checks that both give the same numbers."""
    n = len(x_real)
    x_fake = s.sample(n)
    eps = torch.rand(n, 1, 1, 1, device=x_real.device)
    x_hat = (eps * x_real + (1 - eps) * x_fake).requires_grad_(True)
    scores = s.critic(torch.cat([x_real, x_fake, x_hat]))
    grad, = torch.autograd.grad(scores[2 * n:].sum(), x_hat, create_graph=True)
    loss = scores[n:2 * n].mean() - scores[:n].mean() + dgr.gradient_penalty(grad, lam)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def gan_layout(s: dgr.Scholar, memory_format) -> None:
    """The scholar's GAN weights in this memory layout (dgr.py's is channels_last)."""
    s.generator.to(memory_format=memory_format)
    s.critic.to(memory_format=memory_format)


def bench_steps(device, batches, reps: int, report) -> None:
    """One whole critic step (WGAN-GP, width 64), generator step and solver step (GR replay, half real),
    each with its Adam step as dgr.py builds it, with impl torch and impl ext; then the Adam step of the
    critic's weights alone: PyTorch's default, fused, and as dgr.py runs it graphed."""
    b = dgr.Budget()
    for shape in ((1, 28, 28), (3, 32, 32)):
        s = dgr.Scholar(shape, b).to(device)
        x_all, y_all = (torch.rand(4096, *shape, device=device) * 2 - 1,
                        torch.randint(10, (4096,), device=device))
        task = dgr.Task("bench", x_all, y_all, x_all[:1], y_all[:1])
        replay = dgr.Replay("generator", s.frozen_copy())
        for n in batches:
            x = task.x_train[:n]
            steps = {"critic step": lambda o: dgr.critic_step(s, o["critic"], x, 10.0),
                     "critic step, 3n rows in one batch (before)":
                         lambda o: critic_step_one_batch(s, o["critic"], x, 10.0),
                     # no fused op: a control
                     "generator step": lambda o: dgr.generator_step(s, o["generator"], n),
                     "solver step": lambda o: dgr.solver_step(s, o["solver"], task, replay, 0.5, n)}
            for step in ("critic step", "generator step"):
                steps[f"{step}, bf16 autocast (lever)"] = in_bf16(steps[step], b, device)
            for step, run in steps.items():
                report(time_step({"op": step, "shape": "x".join(map(str, shape)), "batch": n}, run, s, b,
                                 device, reps))
        bench_adam(s.critic, shape, device, reps, report)


def in_bf16(run, b: dgr.Budget, device):
    """run as --budget gan_precision=bf16 runs the GAN's steps (dgr.gan_autocast)."""
    bf16 = dataclasses.replace(b, gan_precision="bf16")

    def run_bf16(opts):
        with dgr.gan_autocast(bf16, device.type):
            return run(opts)
    return run_bf16


def time_step(row: dict, run, s: dgr.Scholar, b: dgr.Budget, device, reps: int) -> dict:
    """Times run(optimizers of s) into row: eager with impl torch and ext; on CUDA also as one CUDA graph
    (--graphs on) with the GAN channels_last (dgr.py's), then NCHW, and the kernels of an eager step."""
    opts = s.optimizers(b)
    for impl in ("torch", "ext"):
        dgr.set_impl(impl)
        try:
            row["eager_ms" if impl == "torch" else "fused_ms"] = time_ms(lambda: run(opts), device, reps)
        finally:
            dgr.set_impl("auto")
    if device.type == "cuda":   # the layouts: the GAN's channels_last against NCHW (a cuDNN kernel that
        try:                     # converts between them can dominate a critic step; reference/README.md)
            for key, layout in (("graphed_ms", torch.channels_last),
                                ("graphed_nchw_ms", torch.contiguous_format)):
                gan_layout(s, layout)
                graph_opts = s.optimizers(b, graphs=True)
                graphed = captured(lambda: run(graph_opts), device)
                graphed()   # eager warm-up 1 of 3; time_ms warms up twice more, captures
                row[key] = time_ms(graphed, device, reps)
        finally:
            gan_layout(s, torch.channels_last)
        try:
            row.update(kernel_profile(lambda: run(opts)))
        except Exception as e:   # no CUPTI, say: the times above still stand
            print(f"profiler failed on the {row['op']}: {type(e).__name__}: {e}", flush=True)
    return row


def critic_step_side_stream(s: dgr.Scholar, opt, x_real: torch.Tensor, lam: float, side) -> torch.Tensor:
    """A lever to measure on a GPU, not in dgr.py: critic_step with the interpolates' branch (forward,
    input gradient, penalty) on a side stream, so that its kernels may overlap those of the real and fake
    scores, forward and backward (autograd runs each backward op on its forward op's stream)."""
    n = len(x_real)
    x_fake = s.sample(n)
    eps = torch.rand(n, 1, 1, 1, device=x_real.device)
    x_hat = (eps * x_real + (1 - eps) * x_fake).requires_grad_(True)
    main = torch.cuda.current_stream(x_real.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        grad, = torch.autograd.grad(s.critic(x_hat).sum(), x_hat, create_graph=True)
        penalty = dgr.gradient_penalty(grad, lam)
    scores = s.critic(torch.cat([x_real, x_fake]))
    main.wait_stream(side)
    loss = scores[n:].mean() - scores[:n].mean() + penalty
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def bench_side_stream(device, batches, reps: int, report) -> None:
    """The side-stream critic step (CUDA only), after every other row: a capture that fails may leave the
    device unusable. First its weights after 3 steps against critic_step's from the same state and random
    numbers (printed), then its times, to read beside the critic step's row."""
    b, side = dgr.Budget(), torch.cuda.Stream(device)
    for shape in ((1, 28, 28), (3, 32, 32)):
        s = dgr.Scholar(shape, b).to(device)
        for n in batches:
            x = torch.rand(n, *shape, device=device) * 2 - 1
            try:
                moved = []
                for step in (dgr.critic_step, lambda *a: critic_step_side_stream(*a, side)):
                    twin = copy.deepcopy(s)
                    opt = dgr.adam(twin.critic, 1e-4, (0.5, 0.9))
                    torch.manual_seed(0)
                    for _ in range(3):
                        step(twin, opt, x, 10.0)
                    moved.append(torch.cat([p.detach().flatten() for p in twin.critic.parameters()]))
                print(f"side stream, {'x'.join(map(str, shape))} B = {n}: "
                      "max |w - critic_step's w| after 3 steps "
                      f"{float((moved[0] - moved[1]).abs().max()):.3g}", flush=True)
                report(time_step({"op": "critic step, interpolates on a side stream (lever)",
                                  "shape": "x".join(map(str, shape)), "batch": n},
                                 lambda o: critic_step_side_stream(s, o["critic"], x, 10.0, side), s, b,
                                 device, reps))
            except Exception as e:
                print(f"side-stream critic step failed ({'x'.join(map(str, shape))}, B = {n}): "
                      f"{type(e).__name__}: {e}", flush=True)
                return


def bench_adam(critic, shape, device, reps: int, report) -> None:
    """Adam on the critic's weights (random gradients): eager = PyTorch's default implementation (foreach
    on CUDA), fused = fused=True, graphed = dgr.adam with --graphs on (fused and capturable), replayed."""
    for p in critic.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    row = {"op": "Adam step (critic weights)", "shape": "x".join(map(str, shape)), "batch": "-",
           "eager_ms": time_ms(torch.optim.Adam(critic.parameters(), lr=1e-4).step, device, reps)}
    if device.type == "cuda":
        row["fused_ms"] = time_ms(torch.optim.Adam(critic.parameters(), lr=1e-4, fused=True).step, device,
                                  reps)
        graphed = captured(dgr.adam(critic, 1e-4, graphs=True).step, device)
        graphed()   # eager warm-up 1 of 3; time_ms warms up twice more and captures
        row["graphed_ms"] = time_ms(graphed, device, reps)
    report(row)


PARTS = ("steps", "losses", "side-stream")   # --parts, in the order timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="batch 64 only, 5 repetitions, no torch.compile")
    parser.add_argument("--out", default="results", help="writes <out>/bench/bench.json and bench.md")
    parser.add_argument("--reps", type=int,
                        help="repetitions per row (default: 50 on CUDA, 10 on CPU, 5 --quick)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="what to time: whole steps, the two losses, the side-stream critic step (CUDA)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    device = torch.device(args.device)
    dgr.load_extension(required=True)
    batches, reps = ((64,), 5) if args.quick else ((64, 256, 1024), 50 if device.type == "cuda" else 10)
    reps = args.reps or reps
    folder = os.path.join(args.out, "bench")
    os.makedirs(folder, exist_ok=True)
    header = [f"## Benchmark ({dgr.machine_name(device)}, torch {torch.__version__}, median of {reps})", "",
              "| what | input | batch | eager ms | compiled ms (speed-up) | fused ms (speed-up) "
              "| graphed ms (speed-up) | graphed, NCHW ms (speed-up) | fused GB/s | kernels, GPU ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    rows = []

    def report(r: dict) -> None:   # each row printed and the files rewritten as soon as it is timed
        cell = lambda key: f"{r[key]:.3f} ({r['eager_ms'] / r[key]:.2f}x)" if key in r else "n/a"
        line = (f"| {r['op']} | {r['shape']} | {r['batch']} | {r['eager_ms']:.3f} | {cell('compiled_ms')} | "
                f"{cell('fused_ms')} | {cell('graphed_ms')} | {cell('graphed_nchw_ms')} | "
                + (f"{r['fused_GBps']:.1f}" if "fused_GBps" in r else "") + " | "
                + (f"{r['kernels']:.0f}, {r['kernel_ms']:.3f}" if "kernels" in r else "") + " |")
        print(line, flush=True)
        rows.append((r, line))
        dgr.write_json(os.path.join(folder, "bench.json"), {"machine": dgr.machine_name(device),
                                                            "torch": torch.__version__,
                                                            "rows": [row for row, _ in rows]})
        dgr.write_text(os.path.join(folder, "bench.md"),
                       "\n".join(header + [line for _, line in rows]) + "\n")

    if "steps" in parts:
        bench_steps(device, batches, reps, report)   # whole steps first: the goals of a GPU check
    if "losses" in parts:
        bench_losses(device, batches, with_compile=not args.quick, reps=reps, report=report)
    if "side-stream" in parts and device.type == "cuda":
        bench_side_stream(device, batches, reps, report)


if __name__ == "__main__":
    main()
