"""The fused ops of csrc/ against the PyTorch references in dgr.py: forward, backward, opcheck, gradcheck,
whole critic and solver steps, and the fallback when the extension cannot be built. CUDA cases run
where a GPU is present (see README for the GPU run)."""
import os

import pytest
import torch

import dgr
from conftest import ROOT

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# bf16/fp16 results are compared with the float64 reference at these relative tolerances
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(scope="module", autouse=True)
def extension():
    assert dgr.load_extension(required=True)   # built by `python setup.py build_ext --inplace` (or JIT)
    assert dgr.use_extension(torch.empty(0), "ext")   # a CPU kernel


def dtypes_for(device):
    return [torch.float32] + ([torch.float64, torch.bfloat16, torch.float16] if device == "cuda" else [])


def close(got, want, dtype):
    """Equal within the dtype's relative tolerance, the absolute one scaled by the reference's magnitude
    (a fixed atol larger than the gradients themselves would pass a kernel that writes zeros)."""
    tol, want = TOL[dtype], want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    return torch.allclose(got.double(), want, rtol=tol, atol=tol * scale + 1e-30)


@pytest.mark.parametrize("dtype", list(TOL))
def test_close_rejects_wrong_kernels(dtype):
    """What a broken kernel would give (zeros, a wrong scale, one wrong row) fails the comparison,
    at every dtype's tolerance; for the record, the largest GP gradient at B = 64 is ~8e-3."""
    g = torch.randn(64, 1, 28, 28).mul_(0.03).requires_grad_(True)
    want = torch.autograd.grad(dgr.gradient_penalty_ref(g, 10.0), g)[0].double()
    assert close(want.to(dtype), want, dtype)
    assert not close(torch.zeros_like(want), want, dtype)
    assert not close(want * 1.1, want, dtype)
    bad_row = want.clone()
    bad_row[7] = 0
    assert not close(bad_row, want, dtype)


def gp_both(g, lam=10.0):
    """(value, grad) of the op on g and of the float64 reference on the same numbers."""
    out = []
    for impl, x in (("ext", g.detach().clone()), ("torch", g.detach().double())):
        x.requires_grad_(True)
        loss = dgr.gradient_penalty(x, lam, impl=impl)
        out.append((loss.detach(), torch.autograd.grad(loss, x)[0]))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("batch", [1, 7, 64, 1024])
def test_gradient_penalty_matches_reference(device, shape, batch):
    for dtype in dtypes_for(device):
        g = torch.randn(batch, *shape, device=device).mul_(0.03).to(dtype)   # norms around 1
        (v, dg), (v_ref, dg_ref) = gp_both(g)
        assert v.dtype == dtype and dg.dtype == dtype and dg.shape == g.shape
        assert close(v, v_ref, dtype), (dtype, v, v_ref)
        assert close(dg, dg_ref, dtype), (dtype, (dg.double() - dg_ref).abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_penalty_non_contiguous_and_zero_row(device):
    g = torch.randn(16, 32, 32, 3, device=device).permute(0, 3, 1, 2)    # channels-last view
    g = g[::2]                                                          # and every other sample
    g[3] = 0.0                                                          # a zero-gradient row
    assert not g.is_contiguous()
    (v, dg), (v_ref, dg_ref) = gp_both(g)
    assert close(v, v_ref, torch.float32) and close(dg, dg_ref, torch.float32)
    assert (dg[3] == 0).all()    # defined as 0 at ||g_b|| = 0, as torch's norm backward gives
    assert dgr.gradient_penalty(g[:0], 10.0, impl="ext").item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["D=785", "misaligned", "B=0"])
def test_gradient_penalty_odd_shapes(device, case):
    """The one-element-at-a-time path (a row length no 16-byte pack divides, a storage offset that is
    no multiple of 16 bytes) and an empty batch, forward and backward."""
    for dtype in dtypes_for(device):
        if case == "D=785":
            g = torch.randn(33, 785, device=device).mul_(0.03).to(dtype)
        elif case == "misaligned":
            g = torch.randn(17 * 784 + 1, device=device).mul_(0.03).to(dtype)[1:].view(17, 1, 28, 28)
            assert g.data_ptr() % 16 != 0
        else:
            g = torch.zeros(0, 1, 28, 28, device=device, dtype=dtype)
        (v, dg), (v_ref, dg_ref) = gp_both(g)
        if case == "B=0":   # the op's empty mean is 0 (the reference's is nan); an empty gradient
            assert v.item() == 0.0 and dg.shape == g.shape
            continue
        assert dg.shape == g.shape and close(v, v_ref, dtype) and close(dg, dg_ref, dtype), (case, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_penalty_row_does_not_depend_on_its_batch(device):
    """Each row's gradient is that row's alone, bit for bit, whichever rows share its batch (the CPU
    kernel sums rows in groups of eight, a partial group last; the CUDA kernel one row per block).
    grad_out = B / 2 makes the op's 2 lam / B factor the same at every batch size."""
    g = torch.randn(13, 785, device=device).mul_(0.03)
    dg_all = torch.ops.dgr.gradient_penalty_backward(torch.tensor(13 / 2, device=device), g, 1.0)
    for rows in (slice(8, 13), slice(3, 11), slice(12, 13)):
        part = g[rows].clone()   # its own storage, so another alignment of rows and groups
        n = len(part)
        dg = torch.ops.dgr.gradient_penalty_backward(torch.tensor(n / 2, device=device), part, 1.0)
        assert torch.equal(dg, dg_all[rows]), rows
    assert (dg_all != 0).all()


def replay_inputs(device, n_real, n_replay, soft, dtype=torch.float32, classes=10):
    lr = torch.randn(n_real, 2 * classes, device=device, dtype=dtype)[:, ::2]   # non-contiguous
    lp = torch.randn(n_replay, classes, device=device, dtype=dtype) * 3
    y = torch.randint(classes, (n_real,), device=device)
    t = (torch.randn(n_replay, classes, device=device).softmax(1).to(dtype) if soft
         else torch.randint(classes, (n_replay,), device=device))
    return lr, y, lp, t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("n_real,n_replay,classes", [(64, 64, 10), (128, 0, 10), (0, 64, 10), (1, 1024, 10),
                                                    (1024, 300, 10), (0, 0, 10), (50, 40, 40), (8, 8, 100)])
def test_replay_loss_matches_reference(device, soft, n_real, n_replay, classes):
    """Including more classes than a warp has lanes (40, 100)."""
    for dtype in dtypes_for(device):
        lr, y, lp, t = replay_inputs(device, n_real, n_replay, soft, dtype, classes)
        for r in (0.0, 0.25, 1.0):
            results = []
            for impl, cast in (("ext", lambda z: z.detach().clone()),
                               ("torch", lambda z: z.detach().double())):
                a, b = cast(lr).requires_grad_(True), cast(lp).requires_grad_(True)
                loss = dgr.replay_loss(a, y, b, t.double() if soft and impl == "torch" else t, r, impl=impl)
                grads = torch.autograd.grad(loss, (a, b), allow_unused=True, materialize_grads=True) \
                    if loss.requires_grad else (torch.zeros_like(a), torch.zeros_like(b))
                results.append((loss.detach(), *grads))
            for got, want in zip(*results):
                assert close(got, want, dtype), (dtype, r, got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    from torch.library import opcheck
    g = torch.randn(8, 3, 32, 32, device=device, requires_grad=True)
    opcheck(torch.ops.dgr.gradient_penalty.default, (g, 10.0))
    opcheck(torch.ops.dgr.gradient_penalty_backward.default,
            (torch.tensor(1.0, device=device), g.detach(), 10.0))
    for soft in (False, True):
        lr, y, lp, t = replay_inputs(device, 16, 8, soft)
        opcheck(torch.ops.dgr.replay_loss_fwd.default, (lr.requires_grad_(), y, lp.requires_grad_(), t, 0.4))


def test_gradcheck_float64():
    g = torch.randn(5, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: torch.ops.dgr.gradient_penalty(x, 3.0), (g,))
    for soft in (False, True):
        lr, y, lp, t = replay_inputs("cpu", 6, 5, soft, torch.float64)
        lr, lp = lr.detach().requires_grad_(), lp.detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: torch.ops.dgr.replay_loss_fwd(a, y, b, t, 0.3)[0],
                                        (lr, lp))


def test_bad_inputs_get_clear_messages():
    """Whole messages, numbers included: an extension linked to its own static libstdc++ (as a
    GCC in /opt/gcc did) cut them at the first integer on the CPU and segfaulted on a GPU (setup.py)."""
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ops.dgr.gradient_penalty(torch.ones(3, 4, dtype=torch.long), 1.0)
    lr, y, lp, t = replay_inputs("cpu", 4, 4, False)
    with pytest.raises(RuntimeError, match=r"labels must be int64 of shape \(4\), got Long \[3\]"):
        torch.ops.dgr.replay_loss_fwd(lr, y[:3], lp, t, 0.5)
    with pytest.raises(RuntimeError, match="real and replayed logits have 10 and 2 classes"):
        torch.ops.dgr.replay_loss_fwd(lr, y, lp[:, :2], t, 0.5)
    with pytest.raises(RuntimeError, match="targets_replay must be"):
        torch.ops.dgr.replay_loss_fwd(lr, y, lp, t.float(), 0.5)
    with pytest.raises(RuntimeError, match=r"class id 1\d out of range \[0, 10\)"):
        torch.ops.dgr.replay_loss_fwd(lr, y, lp, t + 10, 0.5)
    with pytest.raises(RuntimeError, match="at least one class"):
        torch.ops.dgr.replay_loss_fwd(lr[:, :0], y, lp[:, :0], t, 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_labels_stop_with_a_message(device):
    """The CPU kernel raises a RuntimeError; the CUDA kernel checks on the device (a host check would
    synchronise every step), so a bad label is a device-side assert that ends the process: run in a
    subprocess, it exits non-zero naming the check."""
    import subprocess
    import sys
    code = ("import torch, dgr; dgr.load_extension(required=True); d = %r\n"
            "lr = torch.randn(4, 10, device=d); y = torch.tensor([0, 1, 2, 10], device=d)\n"
            "torch.ops.dgr.replay_loss_fwd(lr, y, lr[:0], y[:0], 1.0); "
            "torch.cuda.synchronize() if d == 'cuda' else None\n"
            % device)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "out of range" in proc.stderr, proc.stderr[-2000:]


def test_messages_with_numbers_survive_a_static_libstdcxx(tmp_path):
    """A compiler that links libstdc++ into the module statically, whatever -lstdc++ asks (some GPU machines'
    GCC does), gives the module a copy of libstdc++ whose streams never format numbers: there every
    check whose message streamed a number crashed the process (here, on the CPU, the message stopped at the
    number). The checks build their messages without streams (dgr::message): built by such a compiler, the
    CPU kernels still raise, with the numbers."""
    import shutil
    import subprocess
    import sys
    for name in ("dgr.py", "setup.py", "csrc"):
        (shutil.copytree if name == "csrc" else shutil.copy)(os.path.join(ROOT, name), tmp_path / name)
    # links libstdc++ statically even if asked for -lstdc++; -O0 for speed
    static_gxx = tmp_path / "static-g++"
    static_gxx.write_text(f"#!{sys.executable}\nimport os, re, sys\n"
                          "args = [a for a in sys.argv[1:] if a != '-lstdc++' "
                          "and not re.fullmatch('-O[0-9]', a)]\n"
                          "os.execvp('g++', ['g++', *args, '-O0', '-static-libstdc++'])\n")
    static_gxx.chmod(0o755)
    env = {**os.environ, "CXX": str(static_gxx), "CC": "gcc", "DGR_NO_CUDA": "1"}
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    module = next(tmp_path.glob("dgr_ops*.so"))
    assert "libstdc++" not in subprocess.run(["ldd", str(module)], capture_output=True, text=True).stdout
    code = ("import torch, dgr\n"
            "import sys; assert dgr.load_extension(required=True) "
            "and sys.modules['dgr_ops'].__file__.startswith(%r)\n"
            "x = torch.randn(4, 10); y = torch.zeros(4, dtype=torch.long)\n"
            "for call in [lambda: torch.ops.dgr.replay_loss_fwd(x, y, x[:, :5], y, 0.5),\n"
            "             lambda: torch.ops.dgr.replay_loss_fwd(x[0], y, x[0], y, 0.5),\n"
            "             lambda: torch.ops.dgr.replay_loss_fwd(x, y[:3], x, y, 0.5),\n"
            "             lambda: torch.ops.dgr.replay_loss_fwd(x, y + 10, x[:0], y[:0], 1.0)]:\n"
            "    try:\n        call()\n    except RuntimeError as e:\n        print(str(e).splitlines()[0])\n"
            % str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "dgr::replay_loss: real and replayed logits have 10 and 5 classes",
        "dgr::replay_loss: logits must be 2-d (batch, classes), got [10] and [10]",
        "dgr::replay_loss: labels must be int64 of shape (4), got Long [3]",
        "dgr::replay_loss: class id 10 out of range [0, 10)"]


@pytest.mark.parametrize("device", DEVICES)
def test_works_under_torch_compile(device):
    """The fake kernels let torch.compile trace through both ops without a graph break (on CUDA with
    inductor, which generates code around them; on the CPU with aot_eager, which needs no compiler)."""
    def step(g, lr, y, lp, t):
        return dgr.gradient_penalty(g, 10.0, impl="ext") + dgr.replay_loss(lr, y, lp, t, 0.5, impl="ext")
    args = (torch.randn(8, 1, 28, 28, device=device), *replay_inputs(device, 8, 8, True))
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    assert torch.allclose(compiled(*args), step(*args))


# ---------------------------------------------------------------------------------------------- whole steps

def step_grads(kind, impl, device, seed=0):
    """Parameter gradients of one critic step (double backprop through the penalty) or one solver step."""
    torch.manual_seed(seed)
    b = dgr.Budget(width=8, hidden=32)
    s = dgr.Scholar((1, 28, 28), b).to(device)
    x = torch.rand(16, 1, 28, 28, device=device) * 2 - 1
    y = torch.randint(10, (16,), device=device)
    dgr.set_impl(impl)
    try:
        keep = torch.optim.SGD(s.parameters(), lr=0.0)   # keeps the gradients and the weights
        if kind == "critic":
            dgr.critic_step(s, keep, x, 10.0)
            return [p.grad.clone() for p in s.critic.parameters()]
        task = dgr.Task("t", x, y, x, y)
        dgr.solver_step(s, keep, task, dgr.Replay("generator", s.frozen_copy(), soft=True), 0.5, 16)
        return [p.grad.clone() for p in s.solver.parameters()]
    finally:
        dgr.set_impl("auto")


@pytest.fixture
def no_tf32():
    """fp32 matmuls and convolutions in full fp32 on the GPU, so that only the ops differ."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["critic", "solver"])
def test_whole_step_same_gradients(kind, device, no_tf32):
    ext, ref = step_grads(kind, "ext", device), step_grads(kind, "torch", device)
    for a, b in zip(ext, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


def run_with_impl(impl, fn, *args):
    """fn(*args) with the losses of `impl` (ext or torch); the process-wide choice is restored after."""
    dgr.set_impl(impl)
    try:
        return fn(*args)
    finally:
        dgr.set_impl("auto")


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("exp", ["chain", "permuted", "split", "mnist-svhn", "svhn-mnist", "lwf"])
def test_experiments_train_the_same_model_with_ext_and_torch(exp, svhn_data_dir, monkeypatch,
                                                             float64_default):
    """Every experiment, short budgets, GR (both ops, generator included) and ER, in float64: the two
    implementations differ only by rounding (~1e-16), far below what training can amplify in a few
    dozen steps, so the curves agree to 1e-9 and the accuracies exactly on any machine. (In float32 the
    same comparison depends on the machine's kernels: Adam turns the rounding of a near-zero gradient
    into an lr-sized step, and a CNN solver drifted by 3e-3 in 30 steps.)"""
    from torchvision.datasets import SVHN
    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)
    b = dgr.Budget(**{**dgr.QUICK_COMMON, "solver_iters": 30, "gen_iters": 4, "eval_every": 10, "n_tasks": 2,
                      "train_limit": 500, "test_limit": 300, "warmup_iters": 5 if exp == "lwf" else 0})
    data = {name: tuple(t.double() if t.is_floating_point() else t for t in tensors)
            for name, tensors in dgr.load_data(dgr.EXPERIMENTS[exp], svhn_data_dir,
                                               torch.device("cpu")).items()}
    for variant in ("gr", "er"):
        ext, ref = (run_with_impl(impl, dgr.run_one, dgr.EXPERIMENTS[exp], variant, 0, data, b)
                    for impl in ("ext", "torch"))
        assert len(ext["curves"]) == len(ref["curves"]) >= 6
        for ce, cr in zip(ext["curves"], ref["curves"]):
            assert ce["loss"] == pytest.approx(cr["loss"], rel=1e-9, abs=1e-12), (variant, ce, cr)
            assert ce["acc"] == cr["acc"], (variant, ce, cr)
        assert ext["acc_after_task"] == ref["acc_after_task"]


# ---------------------------------------------------------------------------------------------- fallback

def test_broken_build_falls_back_with_one_warning(tmp_path, monkeypatch):
    (tmp_path / "dgr_ops.cpp").write_text("#error this build is broken on purpose\n")
    monkeypatch.setattr(dgr, "EXTENSION_NAME", "dgr_ops_broken_for_test")
    monkeypatch.setattr(dgr, "CSRC", str(tmp_path))
    monkeypatch.setitem(dgr.OPS, "loaded", None)
    g = torch.randn(8, 1, 28, 28)
    with pytest.warns(RuntimeWarning, match="fused ops unavailable") as record:
        first = dgr.gradient_penalty(g, 10.0)
        second = dgr.gradient_penalty(g, 10.0)
    assert len(record) == 1
    assert first == second == dgr.gradient_penalty_ref(g, 10.0)
    monkeypatch.setitem(dgr.OPS, "loaded", None)
    with pytest.raises(RuntimeError, match="could not be loaded or built"):
        dgr.gradient_penalty(g, 10.0, impl="ext")


# ---------------------------------------------------------------------------------------------- CUDA graphs

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source", ["generator", "stored"])
@pytest.mark.parametrize("gan", ["conv", "mlp"])
def test_graphed_training_equals_eager_training(device, source, gan, monkeypatch, float64_default):
    """train_task with whole steps captured as CUDA graphs (--graphs on) learns what eager steps learn,
    random numbers included (drawn inside the graph, from the same generator), with GR's replay and with
    ER's (real past inputs drawn on the device). In float64 with cuDNN
    deterministic, so that only rounding differs (fused Adam on CUDA either way), far below what 18 steps
    amplify (in float32, Adam turns the rounding of a near-zero gradient into an lr-sized step, and
    cuDNN's default algorithms are not deterministic). Both GANs: the DCGAN and the fully connected one
    (paper permuted's). On the CPU graphs=True runs eager steps."""
    b = dgr.Budget(solver_iters=12, gen_iters=6, n_critic=2, batch=32, gen_batch=16, gan=gan, width=8,
                   hidden=32, solver_schedule="cosine")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    def train(graphs: bool) -> torch.Tensor:
        torch.manual_seed(0)
        x = torch.rand(256, 1, 28, 28, device=device) * 2 - 1
        y = torch.randint(10, (256,), device=device)
        task = dgr.Task("t", x, y, x[:8], y[:8])
        s = dgr.Scholar((1, 28, 28), b).to(device)
        replay = dgr.Replay(source, s.frozen_copy(), pool=[x[:100], x[100:]])
        dgr.train_task(s, s.optimizers(b, graphs), task, replay, 0.5, b,
                       train_generator=source == "generator", graphs=graphs)
        return torch.cat([p.detach().flatten() for p in s.parameters()])
    eager, graphed = train(False), train(True)
    assert eager.dtype == torch.float64
    if device == "cpu":
        assert torch.equal(eager, graphed)
    else:
        diff, rtol, atol = (eager - graphed).abs(), 1e-7, 1e-9
        assert torch.allclose(eager, graphed, rtol=rtol, atol=atol), (
            f"max |diff| {diff.max():.3g} at |w| {eager[diff.argmax()].abs():.3g}; "
            f"{int((diff > atol + rtol * eager.abs()).sum())} of {len(eager)} weights differ")


@pytest.mark.parametrize("device", DEVICES)
def test_step_costs_run_the_steps_as_training_does(device, monkeypatch):
    """The ETA's first costs come from steps run as train_task runs them: with --graphs on, on CUDA, each
    step captured and its replays timed (eager costs, which a graphed run never pays, would inflate it)."""
    b = dgr.Budget(n_critic=2, batch=16, gen_batch=8, width=8, hidden=16)
    sources = ("generator", "stored", "noise", "current", "ewc")
    costs = dgr.step_costs(dgr.EXPERIMENTS["split"], b, torch.device(device), sources, graphs=True)
    kinds = set(dgr.STEP_KINDS) - {"replay solver"} | {f"replay solver ({source})" for source in sources}
    assert set(costs) == kinds and all(c > 0 for c in costs.values()), costs


def test_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    """tests/bench_ops.py, which .ci/gpu-check runs on a lent GPU, runs on the CPU (--quick, one
    repetition per row): every row is timed and written to bench.json and bench.md, so a broken benchmark
    shows here and not in the few minutes of a GPU session."""
    import json
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "bench_ops.py"), "--device", "cpu",
                           "--quick", "--reps", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.load(open(tmp_path / "bench" / "bench.json"))["rows"]
    steps = ["critic step", "critic step, 3n rows in one batch (before)", "generator step", "solver step",
             "critic step, bf16 autocast (lever)", "generator step, bf16 autocast (lever)",
             "Adam step (critic weights)"]
    assert [r["op"] for r in rows] == steps + steps + ["gradient_penalty", "replay_loss", "gradient_penalty"]
    assert all(r["eager_ms"] > 0 for r in rows)
    assert all(r["fused_ms"] > 0 for r in rows if r["op"] in steps[:6])   # impl ext beside impl torch
    assert all(r["fused_ms"] > 0 and "compiled_ms" not in r for r in rows[-3:])
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert md.count("\n| ") == len(rows) + 1   # the header row and one line per row
