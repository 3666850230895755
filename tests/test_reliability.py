"""Runs that survive: kill and resume, refused checkpoints, no silent overwrites, determinism, NaN guard."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

import dgr
from conftest import DATA, ROOT, require_mnist, run_dgr

# a short GR split run: 5 tasks, generator trained on each; checkpoints every 10 steps
SHORT = ["--exp", "split", "--preset", "quick", "--variants", "gr", "--solver-iters", "60", "--gen-iters", "30",
         "--eval-every", "20", "--checkpoint-every", "10"]


def results_of(out, exp="split"):
    with open(os.path.join(out, exp, "gr_seed0.json")) as f:
        res = json.load(f)
    return {k: res[k] for k in ("curves", "acc_after_task", "final", "tasks", "fingerprint")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    require_mnist()
    out = str(tmp_path_factory.mktemp("whole"))
    proc = run_dgr(*SHORT, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_same_seed_same_results(uninterrupted, tmp_path):
    proc = run_dgr(*SHORT, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert results_of(str(tmp_path)) == results_of(uninterrupted)


# chain replaces its scholar at every link: resume must save and restore the current link's scholar
CHAIN = ["--exp", "chain", "--preset", "quick", "--variants", "gr", "--solver-iters", "60", "--gen-iters", "20",
         "--eval-every", "20", "--checkpoint-every", "10"]


@pytest.mark.parametrize("argv,exp,kill_at,occurrence,resumed_at", [
    (SHORT, "split", "task 4-5 solver 40/60", 1, r"task 3, solver step (\d+)"),      # task 3, mid-task
    (CHAIN, "chain", "task mnist solver 40/60", 3, r"task 3, solver step (\d+)"),    # link 3, mid-link
])
def test_killed_run_resumes_to_the_same_results(tmp_path_factory, argv, exp, kill_at, occurrence, resumed_at):
    require_mnist()
    whole = str(tmp_path_factory.mktemp("whole"))
    assert run_dgr(*argv, "--out", whole).returncode == 0
    out = str(tmp_path_factory.mktemp("killed"))
    env = {**os.environ, "DGR_DATA": DATA, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "dgr.py", *argv, "--out", out], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = 0
    for line in proc.stdout:                       # kill it mid-task
        seen += kill_at in line
        if seen == occurrence:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpt = os.path.join(out, exp, "gr_seed0.ckpt")
    assert os.path.exists(ckpt) and not os.path.exists(os.path.join(out, exp, "gr_seed0.json"))

    again = run_dgr(*argv, "--out", out)           # without --resume: refused, nothing touched
    assert again.returncode == 2 and "--resume" in again.stderr

    import torch
    earlier = torch.load(ckpt, weights_only=False)["elapsed"]   # seconds trained before the kill
    resumed = run_dgr(*argv, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    position = re.search(r"resuming from .* at " + resumed_at, resumed.stdout)
    assert position and 30 <= int(position.group(1)) < 60, resumed.stdout[:300]   # mid-task, near step 40
    assert results_of(out, exp) == results_of(whole, exp)
    assert not os.path.exists(ckpt)                # a finished run keeps its JSON, not its checkpoint
    with open(os.path.join(out, exp, "gr_seed0.json")) as f:
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
        c = dgr.Checkpoint(str(ckpt), 10, fingerprint)
        c.save("solver", 10)
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


def test_non_finite_loss_stops_the_run_with_a_message(tmp_path, monkeypatch, capsys):
    require_mnist()
    real = dgr.replay_loss_ref
    monkeypatch.setattr(dgr, "replay_loss_ref", lambda *a: real(*a) * float("nan"))
    code = dgr.main([*SHORT, "--variants", "er", "--impl", "torch", "--out", str(tmp_path), "--data-dir", DATA])
    err = capsys.readouterr().err
    assert code == 3
    assert "split ER seed 0: non-finite solver loss (nan) at task 0-1 solver step 20" in err
    assert "er_seed0.ckpt" in err and "--detect-anomaly" in err
    assert not os.path.exists(tmp_path / "split" / "er_seed0.json")     # no result from a poisoned run
    dgr.set_impl("auto")
