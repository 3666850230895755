"""Runs that survive: kill and resume, refused checkpoints, no silent overwrites, determinism, NaN guard."""
import json
import os
import signal
import socket

import pytest
import torch

import dgr
from conftest import DATA, ROOT, require_mnist, run_dgr

# a short GR split run: 5 tasks, generator trained on each; checkpoints every 10 steps
SHORT = ["--exp", "split", "--preset", "quick", "--variants", "gr", "--budget",
         "solver_iters=60,gen_iters=30,eval_every=20", "--checkpoint-every", "10"]


def with_budget(argv: list[str], **fields) -> list[str]:
    """argv with the fields of its --budget changed or added."""
    i = argv.index("--budget") + 1
    budget = {**dict(item.split("=") for item in argv[i].split(",")),
              **{k: str(v) for k, v in fields.items()}}
    return [*argv[:i], ",".join(f"{k}={v}" for k, v in budget.items()), *argv[i + 1:]]


def results_of(out, exp="split", variant="gr"):
    with open(os.path.join(out, exp, f"{variant}_seed0.json")) as f:
        res = json.load(f)
    return {k: res[k] for k in ("curves", "acc_after_task", "final", "tasks", "fingerprint")}


_whole = {}


def whole_run(tmp_path_factory, argv) -> str:
    """The --out folder of an uninterrupted run of `argv`, made once per test session."""
    require_mnist()
    if tuple(argv) not in _whole:
        out = str(tmp_path_factory.mktemp("whole"))
        proc = run_dgr(*argv, "--out", out)
        assert proc.returncode == 0, proc.stderr
        _whole[tuple(argv)] = out
    return _whole[tuple(argv)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return whole_run(tmp_path_factory, SHORT)


def test_same_seed_same_results(uninterrupted, tmp_path):
    proc = run_dgr(*SHORT, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert results_of(str(tmp_path)) == results_of(uninterrupted)


# chain replaces its scholar at every link: resume must save and restore the current link's scholar
CHAIN = ["--exp", "chain", "--preset", "quick", "--variants", "gr", "--budget",
         "solver_iters=60,gen_iters=20,eval_every=20", "--checkpoint-every", "10"]
EWC = [*SHORT[:4], "--variants", "ewc", *SHORT[6:]]
EMA = [*SHORT, "--budget", "gen_ema=0.9"]   # the generator's running average in the run state


@pytest.mark.parametrize("argv,exp,variant,kill_at", [
    (SHORT, "split", "gr", (2, "solver", 40)),        # task 3, solver phase
    (SHORT, "split", "gr", (1, "generator", 20)),     # task 2, generator phase
    (CHAIN, "chain", "gr", (2, "solver", 40)),        # link 3, a new scholar
    (EWC, "split", "ewc", (2, "solver", 40)),         # EWC: Fisher and anchors in the run state
    (EMA, "split", "gr", (1, "generator", 20)),       # gen_ema: the average, mid-task
], ids=["split-solver", "split-generator", "chain", "ewc", "gen-ema"])
def test_killed_run_resumes_to_the_same_results(tmp_path_factory, argv, exp, variant, kill_at):
    """The run SIGKILLs itself right after saving the checkpoint at `kill_at` (tests/patched_dgr.py), a
    point the test controls; resumed, it ends with the results of an uninterrupted run."""
    whole = whole_run(tmp_path_factory, argv)
    out = str(tmp_path_factory.mktemp("killed"))
    killed = run_dgr(*argv, "--out", out, patches=("kill-at=%d:%s:%d" % kill_at,))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ckpt = os.path.join(out, exp, f"{variant}_seed0.ckpt")
    assert os.path.exists(ckpt) and not os.path.exists(os.path.join(out, exp, f"{variant}_seed0.json"))

    again = run_dgr(*argv, "--out", out)           # without --resume: refused, nothing touched
    assert again.returncode == 2 and "--resume" in again.stderr

    import torch
    earlier = torch.load(ckpt, weights_only=True)["elapsed"]   # seconds trained before the kill
    resumed = run_dgr(*argv, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    stage, phase, step = kill_at
    assert f"at task {stage + 1}, {phase} step {step}" in resumed.stdout, resumed.stdout[:500]
    assert results_of(out, exp, variant) == results_of(whole, exp, variant)
    assert not os.path.exists(ckpt)                # a finished run keeps its JSON, not its checkpoint
    with open(os.path.join(out, exp, f"{variant}_seed0.json")) as f:
        assert json.load(f)["wall_time_s"] > earlier > 0   # the wall time counts both sessions


def test_resume_skips_finished_runs(uninterrupted):
    before = open(os.path.join(uninterrupted, "split", "gr_seed0.json")).read()
    proc = run_dgr(*SHORT, "--out", uninterrupted, "--resume")
    assert proc.returncode == 0 and "finished earlier, kept" in proc.stdout
    assert open(os.path.join(uninterrupted, "split", "gr_seed0.json")).read() == before


@pytest.mark.parametrize("damage,message", [
    ("corrupt", "is unreadable"),
    ("other config", "belongs to another run (differs in: solver_iters 60 != 80"),
])
def test_bad_checkpoint_is_refused_and_nothing_overwritten(tmp_path, damage, message):
    require_mnist()
    folder = tmp_path / "split"
    folder.mkdir()
    kept = folder / "gr_seed0.json"
    kept.write_text("earlier results")
    ckpt = folder / "gr_seed0.ckpt"
    if damage == "corrupt":
        ckpt.write_bytes(b"\x00not a checkpoint")
        argv = SHORT
    else:
        fingerprint = dgr.run_fingerprint("split", "gr", 0, dgr.parse_args(SHORT),
                                          dgr.budget_for(dgr.parse_args(SHORT), "split"),
                                          {"device": "cpu", "impl": dgr.impl_in_use(torch.device("cpu")),
                                           "graphs": False})
        b = dgr.budget_for(dgr.parse_args(SHORT), "split")
        s = dgr.Scholar((1, 28, 28), b)
        dgr.Checkpoint(str(ckpt), 10, fingerprint).save(dgr.Run(s, s.optimizers(b)), b)
        argv = with_budget(SHORT, solver_iters=80)   # another run
    proc = run_dgr(*argv, "--out", str(tmp_path), "--resume")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert kept.read_text() == "earlier results"


def test_existing_results_need_overwrite(uninterrupted, tmp_path):
    import shutil
    out = str(tmp_path / "copy")
    shutil.copytree(uninterrupted, out)
    refused = run_dgr(*SHORT, "--out", out)
    assert (refused.returncode == 2 and "already holds results" in refused.stderr
            and "--overwrite" in refused.stderr)
    replaced = run_dgr(*with_budget(SHORT, solver_iters=40), "--out", out, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert results_of(out)["fingerprint"]["solver_iters"] == 40
    both = run_dgr(*SHORT, "--out", out, "--overwrite", "--resume")
    assert both.returncode == 2 and "exclude each other" in both.stderr


def nan_after(monkeypatch, name, calls):
    """Make dgr's reference function `name` return NaN from its call number `calls` + 1 on (in training:
    the step costs for the ETA, timed before the run, are stubbed out so that they call nothing)."""
    real, count = getattr(dgr, name), [0]
    monkeypatch.setattr(dgr, "step_costs", lambda *a, **k: dict.fromkeys(dgr.STEP_KINDS, 0.0))

    def poisoned(*args):
        count[0] += 1
        return real(*args) * (float("nan") if count[0] > calls else 1.0)
    monkeypatch.setattr(dgr, name, poisoned)


def saved_position(path):
    """Where the checkpoint at `path` stands, in words; its state must be finite."""
    import torch
    state = torch.load(path, weights_only=True)["run"]
    assert dgr.first_non_finite(state) is None
    return dgr.position(state["stage"], state["step"], dgr.budget_for(dgr.parse_args(SHORT), "split"))


def test_non_finite_loss_stops_the_run_with_a_message(tmp_path, monkeypatch, capsys):
    require_mnist()
    nan_after(monkeypatch, "replay_loss_ref", 15)     # solver steps 1-15 fine, a checkpoint at step 10
    code = dgr.main([*SHORT, "--variants", "er", "--impl", "torch", "--out", str(tmp_path),
                     "--data-dir", DATA])
    err = capsys.readouterr().err
    assert code == 3
    assert "split ER seed 0: non-finite solver loss (nan) at task 0-1 solver step 20" in err
    assert ("the last checkpoint is " + str(tmp_path / "split" / "er_seed0.ckpt") in err
            and "--detect-anomaly" in err)
    assert not os.path.exists(tmp_path / "split" / "er_seed0.json")     # no result from a poisoned run
    assert saved_position(tmp_path / "split" / "er_seed0.ckpt") == "task 1, solver step 10"


@pytest.mark.parametrize("phase,poisoned,variant,argv", [
    # losses checked at step 60 only
    ("solver", "replay_loss_ref", "er", with_budget(SHORT, eval_every=60)),
    # 3 critic steps per generator step
    ("generator", "gradient_penalty_ref", "gr", with_budget(SHORT, eval_every=60)),
])
def test_no_checkpoint_holds_non_finite_weights(tmp_path, monkeypatch, capsys, phase, poisoned, variant,
                                                argv):
    """Weights turn NaN between two checkpoints and before any loss check: the save at step 20 refuses
    them and the checkpoint of step 10 stays, finite."""
    require_mnist()
    nan_after(monkeypatch, poisoned, 15 if phase == "solver" else 3 * 12)
    code = dgr.main([*argv, "--variants", variant, "--impl", "torch", "--out", str(tmp_path),
                     "--data-dir", DATA])
    err = capsys.readouterr().err
    ckpt = tmp_path / "split" / f"{variant}_seed0.ckpt"
    assert code == 3, err
    assert "non-finite values in scholar." in err and f"at task 1, {phase} step 20, not saved" in err, err
    assert f"the last checkpoint is {ckpt}" in err
    assert saved_position(ckpt) == f"task 1, {phase} step 10"


def test_failed_write_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    import errno
    import torch
    require_mnist()
    real, saves = torch.save, []

    def disk_full_after_one(obj, path, *a, **k):
        saves.append(path)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", disk_full_after_one)
    code = dgr.main([*SHORT, "--variants", "er", "--out", str(tmp_path), "--data-dir", DATA])
    err = capsys.readouterr().err
    ckpt = tmp_path / "split" / "er_seed0.ckpt"
    assert code == 3 and "Traceback" not in err
    assert f"split ER seed 0: writing {ckpt} failed (OSError: No space left on device)" in err
    assert f"the last checkpoint is {ckpt}" in err
    assert saved_position(ckpt) == "task 1, solver step 10"
    assert not [f for f in os.listdir(ckpt.parent) if f.endswith(".tmp")]


def test_a_cuda_checkpoint_resumes_with_the_optimizers_own_lr():
    """On CUDA dgr.adam's lr is a float32 tensor on the device, and the checkpoint saves it so; loaded
    (on the CPU, map_location) into a run, each optimizer keeps its own lr, a float here, with the saved
    value, and steps: torch's load_state_dict alone would put the saved tensor in its place."""
    import torch
    b = dgr.Budget(width=4, hidden=8)
    s = dgr.Scholar((1, 28, 28), b)
    state = dgr.Run(s, s.optimizers(b)).state_dict()
    for o in state["opts"].values():
        for g in o["param_groups"]:
            g["lr"] = torch.tensor(g["lr"] / 2, dtype=torch.float32)
    run = dgr.Run(s, s.optimizers(b))
    run.load_state_dict(state)
    for k, o in run.opts.items():
        for g, saved in zip(o.param_groups, state["opts"][k]["param_groups"]):
            assert type(g["lr"]) is float and g["lr"] == float(saved["lr"])
    loss = s.solver(torch.zeros(2, 1, 28, 28)).sum()
    loss.backward()
    run.opts["solver"].step()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_saves_its_step_and_resumes_to_the_same_results(tmp_path_factory, signum):
    """Ctrl-C (or SIGTERM, as a cluster's scheduler sends) during training: the step in progress ends, a
    checkpoint is saved, one line names it and the command that continues, exit 130 (143); that command
    ends with the results of an uninterrupted run."""
    import subprocess
    import sys
    whole = whole_run(tmp_path_factory, SHORT)
    out = str(tmp_path_factory.mktemp("interrupted"))
    env = {**os.environ, "DGR_DATA": DATA, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "dgr.py", *SHORT, "--out", out], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if "task 2-3 solver 20/60" in line:   # in the middle of the second task
            proc.send_signal(signum)
            break
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr
    last = stderr.strip().splitlines()[-1]
    ckpt = os.path.join(out, "split", "gr_seed0.ckpt")
    assert last.startswith("dgr.py: interrupted: split GR seed 0 saved at task 2, solver step ")
    assert f" to {ckpt}; continue with: python dgr.py " in last and last.endswith(" --resume"), last
    assert "Traceback" not in stderr and not os.path.exists(os.path.join(out, "split", "gr_seed0.json"))
    command = last.split("continue with: ")[1].split()[2:]
    resumed = run_dgr(*command)
    assert resumed.returncode == 0, resumed.stderr
    assert results_of(out) == results_of(whole)


# -------------------------------------------------------------------------------- nothing lost, nothing mixed

TINY = ["--exp", "split", "--preset", "quick", "--variants", "gr", "--budget",
        "solver_iters=20,gen_iters=6,eval_every=10", "--checkpoint-every", "10"]


def test_two_processes_never_write_one_run(tmp_path):
    """Two commands that want the same run (here with different budgets) into one --out at once: the second
    is refused before it trains, naming the process that holds the run; the first finishes its run."""
    import subprocess
    import sys
    env = {**os.environ, "DGR_DATA": DATA, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "dgr.py", *SHORT, "--out", str(tmp_path)], cwd=ROOT, env=env,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in first.stdout:
        if "solver 20/60" in line:
            break
    second = run_dgr(*SHORT, "--budget", "lam=5", "--out", str(tmp_path))
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.strip() == (f"dgr.py: error: {tmp_path / 'split' / 'gr_seed0'} is being trained "
                                     f"by process {first.pid} on {socket.gethostname()} (its lock "
                                     f"{tmp_path / 'split' / 'gr_seed0.lock'}): "
                                     "wait for it, or choose another --out")
    assert results_of(str(tmp_path))["fingerprint"]["lam"] == 10.0
    # no lock, checkpoint or temp file left
    assert sorted(os.listdir(tmp_path / "split")) == ["accuracy.png", "gr_seed0.json",
                                                      "gr_seed0_samples_tasks.png", "summary.md"]


def test_a_killed_run_leaves_no_lock(tmp_path):
    """A lock is the OS's: a run killed outright (SIGKILL) holds none, and the next command takes it."""
    killed = run_dgr(*TINY, "--out", str(tmp_path), patches=("kill-at=1:solver:10",))
    assert killed.returncode == -signal.SIGKILL
    resumed = run_dgr(*TINY, "--out", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not os.path.exists(tmp_path / "split" / "gr_seed0.lock")


def test_a_resume_under_another_implementation_is_refused(tmp_path):
    """The fingerprint holds what changes the numbers, the losses' implementation included."""
    if dgr.impl_in_use(torch.device("cpu")) != "ext":
        pytest.skip("the fused op is not built here: both implementations are the PyTorch reference")
    killed = run_dgr(*TINY, "--out", str(tmp_path), patches=("kill-at=1:solver:10",))
    assert killed.returncode == -signal.SIGKILL
    other = run_dgr(*TINY, "--out", str(tmp_path), "--resume", "--impl", "torch")
    assert (other.returncode == 2
            and "belongs to another run (differs in: impl 'ext' != 'torch')" in other.stderr)


def saved_checkpoint(tmp_path, change):
    """A checkpoint of TINY's run, with the run's own fingerprint, its state changed by change(state)."""
    args = dgr.parse_args([*TINY, "--out", str(tmp_path)])
    b = dgr.budget_for(args, "split")
    runs_on = {"device": "cpu", "impl": dgr.impl_in_use(torch.device("cpu")), "graphs": False}
    s = dgr.Scholar((1, 28, 28), b)
    state = dgr.Run(s, s.optimizers(b)).state_dict()
    change(state)
    (tmp_path / "split").mkdir(exist_ok=True)
    fingerprint = dgr.run_fingerprint("split", "gr", 0, args, b, runs_on)
    torch.save({"fingerprint": fingerprint, "elapsed": 1.0, "run": state},
               tmp_path / "split" / "gr_seed0.ckpt")


@pytest.mark.parametrize("change,message", [
    (lambda st: st.update(stage=9), "its position, task 9 step 0, lies outside this run's 5 tasks"),
    (lambda st: st.update(step=-3), "its position, task 0 step -3, lies outside"),
    (lambda st: st["scholar"].pop("solver.heads.0.bias"), "its contents do not fit this run: RuntimeError"),
    (lambda st: st["scholar"].update({"solver.heads.0.weight": torch.zeros(3, 3)}),
     "its contents do not fit this run: RuntimeError"),
    (lambda st: st.pop("opts"), "its contents do not fit this run: KeyError"),
], ids=["stage past the end", "negative step", "a key missing", "another shape", "no optimizers"])
def test_a_checkpoint_is_checked_before_it_is_trusted(tmp_path, change, message):
    require_mnist()
    saved_checkpoint(tmp_path, change)
    proc = run_dgr(*TINY, "--out", str(tmp_path), "--resume")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"checkpoint {tmp_path / 'split' / 'gr_seed0.ckpt'} is unreadable ({message}" in proc.stderr


@pytest.mark.parametrize("content,message", [
    ('{"fingerprint": {"exp": "spl', "JSONDecodeError"),
    ("[1, 2, 3]", "ValueError: no fingerprint"),
    ('{"final": 3}', "ValueError: no fingerprint"),
], ids=["truncated", "a list", "hand-edited"])
def test_resume_over_a_damaged_result_is_one_line(tmp_path, content, message):
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "gr_seed0.json").write_text(content)
    proc = run_dgr(*TINY, "--out", str(tmp_path), "--resume")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (f"{tmp_path / 'split' / 'gr_seed0.json'} is not a readable result of dgr.py ({message}"
            in proc.stderr)


def full_disk_on(monkeypatch, target, error, name):
    """Make `target` (module, name) raise `error` when it writes the temp file of the file `name`."""
    owner, attr = target
    real = getattr(owner, attr)

    def fails(*args, **kwargs):
        if any(os.path.basename(str(a)).startswith(name + ".") and str(a).endswith(".tmp") for a in args):
            raise error
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, attr, fails)


@pytest.mark.parametrize("what", ["checkpoint", "figure", "summary"])
def test_every_failed_write_is_one_line_and_exit_3(tmp_path, monkeypatch, capsys, what):
    """Whatever a full disk raises where (torch.save a RuntimeError, matplotlib and open their own), the
    command stops with one line naming the file, exit 3, and leaves no temp file."""
    import builtins
    import matplotlib.figure
    require_mnist()
    target, error = {
        "checkpoint": ((torch, "save"),
                       RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 0")),
        "figure": ((matplotlib.figure.Figure, "savefig"), OSError(28, "No space left on device")),
        "summary": ((builtins, "open"), OSError(28, "No space left on device")),
    }[what]
    name = {"checkpoint": "none_seed0.ckpt", "figure": "accuracy.png", "summary": "summary.md"}[what]
    full_disk_on(monkeypatch, target, error, name)
    code = dgr.main([*TINY, "--variants", "none", "--out", str(tmp_path), "--data-dir", DATA])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" not in err, err
    line, = [ln for ln in err.splitlines() if ln.startswith("dgr.py:")]
    assert f"writing {tmp_path / 'split' / name} failed ({type(error).__name__}: " in line, line
    assert not [f for f in os.listdir(tmp_path / "split") if f.endswith(".tmp")]


def test_a_real_full_disk_stops_the_run_with_one_line(tmp_path):
    """A 3 MB tmpfs as --out: the checkpoints fill it, the run stops (exit 3) with one line, the last good
    checkpoint kept and no temp file left."""
    import subprocess
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        proc = run_dgr("--exp", "split", "--preset", "quick", "--variants", "gr", "--budget",
                       "width=64,solver_iters=20,gen_iters=10,eval_every=10", "--checkpoint-every", "5",
                       "--out", str(mount))
        assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("dgr.py: stopped: split GR seed 0: writing ") and " failed (" in line, line
        assert not [f for f in os.listdir(mount / "split") if f.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mount)])


def test_stale_temp_files_are_cleared_at_the_next_start(tmp_path):
    require_mnist()
    folder = tmp_path / "split"
    folder.mkdir()
    host = socket.gethostname()
    stale = [f"gr_seed0.ckpt.{host}-999999.tmp", "gr_seed0.ckpt.otherhost-5.tmp",
             f"summary.md.{host}-999999.tmp"]
    kept = "summary.md.otherhost-5.tmp"   # another machine's, maybe alive
    for name in stale + [kept]:
        (folder / name).write_text("half a file")
    proc = run_dgr(*with_budget(TINY, solver_iters=10, gen_iters=2), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert [f for f in os.listdir(folder) if f.endswith(".tmp")] == [kept]


@pytest.mark.parametrize("argv", [["--r", "0.95"], ["--budget", "batch=1"], ["--budget", "gen_batch=2"]],
                         ids=["r 0.95", "batch 1", "gen_batch 2"])
def test_gr_trains_with_a_one_sample_replay(tmp_path, argv):
    """A replayed batch of one row (r = 0.95 of a GAN batch of 16; a solver batch of 1) trains: the old
    generator draws two samples where its batch norm needs them. A GAN batch of 1 is refused up front."""
    require_mnist()
    proc = run_dgr(*with_budget(TINY, solver_iters=10, gen_iters=3), *argv, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    bad = run_dgr(*TINY, "--budget", "gen_batch=1", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--budget: gen_batch is >= 2, got 1" in bad.stderr


def test_train_task_stops_on_a_non_finite_loss():
    """The guard lives in the library: train_task raises, whoever calls it."""
    b = dgr.Budget(solver_iters=10, gen_iters=2, n_critic=1, gan="mlp", width=4, hidden=8, batch=4,
                   gen_batch=4, eval_every=5, solver_lr=1e30)
    s = dgr.Scholar((1, 8, 8), b, n_classes=3)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    task = dgr.Task("t", x, torch.arange(8) % 3, x, torch.arange(8) % 3)
    with pytest.raises(dgr.NonFiniteLoss,
                       match=r"non-finite solver loss \(nan\) at task t solver step (5|10)"):
        dgr.train_task(s, s.optimizers(b), task, dgr.Replay(), 1.0, b)


def test_anomaly_detection_on_a_divergence_is_one_line(tmp_path, monkeypatch, capsys):
    require_mnist()
    nan_after(monkeypatch, "replay_loss_ref", 5)
    code = dgr.main([*TINY, "--variants", "er", "--impl", "torch", "--detect-anomaly", "--out", str(tmp_path),
                     "--data-dir", DATA])
    err = capsys.readouterr().err
    torch.autograd.set_detect_anomaly(False)
    assert code == 3 and "Traceback" not in err, err
    assert "split ER seed 0: " in err and ("anomaly detection: " in err or "non-finite solver loss" in err)


def test_the_last_task_end_is_named_so():
    b = dgr.budget_for(dgr.parse_args(SHORT), "split")
    assert dgr.position(5, 0, b, 5) == "the end of the last task"
    assert dgr.position(4, 70, b, 5) == "task 5, generator step 10"


@pytest.mark.parametrize("damage,message", [
    ("swapped", "train-images-idx3-ubyte is not MNIST's train-images-idx3-ubyte (header (2051, 10000)"),
    ("random bytes", "t10k-labels-idx1-ubyte is not MNIST's t10k-labels-idx1-ubyte (header "),
    ("empty labels",
     "train-labels-idx1-ubyte is not MNIST's train-labels-idx1-ubyte (header (2049, 0), 8 bytes"),
])
def test_damaged_mnist_files_are_named(tmp_path, damage, message):
    require_mnist()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in dgr.MNIST_FILES:
        (raw / name).symlink_to(os.path.join(DATA, "MNIST", "raw", name))
    if damage == "swapped":
        (raw / "train-images-idx3-ubyte").unlink()
        (raw / "train-images-idx3-ubyte").symlink_to(
            os.path.join(DATA, "MNIST", "raw", "t10k-images-idx3-ubyte"))
    elif damage == "random bytes":
        (raw / "t10k-labels-idx1-ubyte").unlink()
        (raw / "t10k-labels-idx1-ubyte").write_bytes(os.urandom(10008))
    else:
        (raw / "train-labels-idx1-ubyte").unlink()
        (raw / "train-labels-idx1-ubyte").write_bytes((2049).to_bytes(4, "big") + (0).to_bytes(4, "big"))
    proc = run_dgr(*TINY, "--out", str(tmp_path / "out"), data_dir=str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr and "delete it to download it again" in proc.stderr, proc.stderr


def test_a_damaged_svhn_file_is_named(tmp_path, svhn_data_dir):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(svhn_data_dir, data, symlinks=True)
    (data / "SVHN" / "test_32x32.mat").write_bytes(os.urandom(4096))
    proc = run_dgr("--exp", "lwf", "--preset", "quick", "--variants", "none", "--budget", "solver_iters=10",
                   "--out", str(tmp_path / "out"), data_dir=str(data), patches=("svhn-md5",))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"SVHN's {data / 'SVHN' / 'test_32x32.mat'} cannot be read (" in proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["--budget", "temperature=nan"], "--budget: temperature is > 0, got nan"),
    (["--budget", "temperature=inf"], "--budget: temperature is > 0, got inf"),
    (["--r", "nan"], "--r must lie in [0, 1], got nan"),
    (["--seed-start", str(2 ** 63)], "--seed-start must lie in [0, 1000000000], got 9223372036854775808"),
    (["--seeds", "3000000", "--estimate"], "--seeds must lie in [1, 1000], got 3000000"),
    (["--device", "meta"], "--device meta: dgr.py runs on cpu or cuda"),
    (["--device", "mps"], "--device mps: dgr.py runs on cpu or cuda"),
    (["--out", ""], "--out is empty"),
    (["--budget", "width=8", "--budget", "width=16"], "--budget: width is given twice"),
    (["--budget", "gen_batch=1"], "--budget: gen_batch is >= 2, got 1"),
])
def test_every_flag_is_checked_before_anything_runs(tmp_path, argv, message):
    proc = run_dgr("--exp", "split", *argv, data_dir=str(tmp_path / "no-data"), timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr
    assert not os.path.exists(tmp_path / "no-data")


def test_a_budget_too_large_for_memory_is_one_line(tmp_path):
    proc = run_dgr("--exp", "split", "--preset", "quick", "--variants", "gr", "--budget", "width=100000000",
                   "--out", str(tmp_path), "--estimate")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    assert "dgr.py: stopped: out of memory (" in proc.stderr


def test_repeated_variants_and_budgets_make_one_plan(tmp_path):
    proc = run_dgr("--exp", "split", "--preset", "quick", "--variants", "none,none", "--budget", "batch=32",
                   "--budget", "test_limit=500", "--out", str(tmp_path), "--estimate")
    assert proc.returncode == 0 and "split: 1 run(s) to do" in proc.stdout, proc.stdout + proc.stderr
    args = dgr.parse_args(["--exp", "split", "--preset", "quick", "--budget", "batch=32", "--budget",
                           "test_limit=500"])
    assert (dgr.budget_for(args, "split").batch, dgr.budget_for(args, "split").test_limit) == (32, 500)


def test_a_stop_during_setup_is_a_stop_not_a_fallback(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM while the ops build, a dataset or a checkpoint loads stops the command (Interrupted,
    exit 128 + signal) instead of being taken for a failure: no fallback to the PyTorch losses for the rest of
    the run, no "damaged, delete it" for a good dataset, no "unreadable" for a good checkpoint."""
    def stopped(*args, **kwargs):
        raise dgr.Interrupted(signal.SIGTERM)

    from torch.utils import cpp_extension
    monkeypatch.setattr(dgr, "EXTENSION_NAME", "dgr_ops_not_built_for_test")
    monkeypatch.setitem(dgr.OPS, "loaded", None)
    monkeypatch.setattr(cpp_extension, "load", stopped)
    with pytest.raises(dgr.Interrupted):
        dgr.load_extension()
    assert dgr.OPS["loaded"] is None   # the next use tries again

    present = tmp_path / "data.bin"
    present.write_bytes(b"x")
    with pytest.raises(dgr.Interrupted):
        dgr.open_dataset(stopped, str(tmp_path), [str(present)], str(tmp_path))
    # stopped while downloading: the folder the download made is removed as on a failure
    new = tmp_path / "new"
    with pytest.raises(dgr.Interrupted):
        dgr.open_dataset(lambda *a, **k: (new.mkdir(), stopped())[1], str(new), [str(new / "f")], str(new))
    assert not new.exists()

    torch.save({"fingerprint": {}, "run": {}, "elapsed": 0.0}, tmp_path / "run.pt")
    monkeypatch.setattr(torch, "load", stopped)
    with pytest.raises(dgr.Interrupted):
        dgr.Checkpoint(str(tmp_path / "run.pt")).load()
