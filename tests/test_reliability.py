"""Runs that survive: kill and resume, refused checkpoints, no silent overwrites, determinism, NaN guard."""
import json
import os
import signal

import pytest

import dgr
from conftest import DATA, ROOT, require_mnist, run_dgr

# a short GR split run: 5 tasks, generator trained on each; checkpoints every 10 steps
SHORT = ["--exp", "split", "--preset", "quick", "--variants", "gr", "--solver-iters", "60", "--gen-iters", "30",
         "--eval-every", "20", "--checkpoint-every", "10"]


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
CHAIN = ["--exp", "chain", "--preset", "quick", "--variants", "gr", "--solver-iters", "60", "--gen-iters", "20",
         "--eval-every", "20", "--checkpoint-every", "10"]
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
        fingerprint = dgr.run_fingerprint("split", "gr", 0, dgr.parse_args(SHORT), dgr.budget_for(dgr.parse_args(SHORT), "split"))
        b = dgr.budget_for(dgr.parse_args(SHORT), "split")
        s = dgr.Scholar((1, 28, 28), b)
        dgr.Checkpoint(str(ckpt), 10, fingerprint).save(dgr.Run(s, s.optimizers(b)), b)
        argv = [a if a != "60" else "80" for a in SHORT]       # --solver-iters 80: another run
    proc = run_dgr(*argv, "--out", str(tmp_path), "--resume")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert kept.read_text() == "earlier results"


def test_existing_results_need_overwrite(uninterrupted, tmp_path):
    import shutil
    out = str(tmp_path / "copy")
    shutil.copytree(uninterrupted, out)
    refused = run_dgr(*SHORT, "--out", out)
    assert refused.returncode == 2 and "already holds results" in refused.stderr and "--overwrite" in refused.stderr
    replaced = run_dgr(*SHORT, "--out", out, "--overwrite", "--solver-iters", "40")
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
    code = dgr.main([*SHORT, "--variants", "er", "--impl", "torch", "--out", str(tmp_path), "--data-dir", DATA])
    err = capsys.readouterr().err
    assert code == 3
    assert "split ER seed 0: non-finite solver loss (nan) at task 0-1 solver step 20" in err
    assert "the last checkpoint is " + str(tmp_path / "split" / "er_seed0.ckpt") in err and "--detect-anomaly" in err
    assert not os.path.exists(tmp_path / "split" / "er_seed0.json")     # no result from a poisoned run
    assert saved_position(tmp_path / "split" / "er_seed0.ckpt") == "task 1, solver step 10"


@pytest.mark.parametrize("phase,poisoned,variant,argv", [
    ("solver", "replay_loss_ref", "er", ["--eval-every", "60"]),       # losses checked at step 60 only
    ("generator", "gradient_penalty_ref", "gr", ["--eval-every", "60"]),   # 3 critic steps per generator step
])
def test_no_checkpoint_holds_non_finite_weights(tmp_path, monkeypatch, capsys, phase, poisoned, variant, argv):
    """Weights turn NaN between two checkpoints and before any loss check: the save at step 20 refuses
    them and the checkpoint of step 10 stays, finite."""
    require_mnist()
    nan_after(monkeypatch, poisoned, 15 if phase == "solver" else 3 * 12)
    code = dgr.main([*SHORT, "--variants", variant, "--impl", "torch", *argv, "--out", str(tmp_path), "--data-dir", DATA])
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
    assert "split ER seed 0: writing failed ([Errno 28] No space left on device)" in err
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
    assert last.startswith(f"dgr.py: interrupted: split GR seed 0 saved at task 2, solver step ")
    assert f" to {ckpt}; continue with: python dgr.py " in last and last.endswith(" --resume"), last
    assert "Traceback" not in stderr and not os.path.exists(os.path.join(out, "split", "gr_seed0.json"))
    command = last.split("continue with: ")[1].split()[2:]
    resumed = run_dgr(*command)
    assert resumed.returncode == 0, resumed.stderr
    assert results_of(out) == results_of(whole)
