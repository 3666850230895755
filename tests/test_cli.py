"""dgr.py's command line on real MNIST: every experiment end to end at the quick preset, the bad inputs, the
expected time and ETA, --jobs and job arrays, the results' figures and summaries."""
import dataclasses
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import dgr
from conftest import DATA, ROOT, require_mnist, run_dgr

ALL_VARIANTS = ("gr", "er", "noise", "none")
# a CLI run's runs_on here
CPU_RUN = {"device": "cpu", "impl": dgr.impl_in_use(torch.device("cpu")), "graphs": False}


def load_run(out, exp, variant, seed=0):
    with open(os.path.join(out, exp, f"{variant}_seed{seed}.json")) as f:
        return json.load(f)


def check_outputs(out, exp, n_results, variants=ALL_VARIANTS):
    folder = os.path.join(out, exp)
    for v in variants:
        res = load_run(out, exp, v)
        assert res["exp"] == exp and res["variant"] == v and res["seed"] == 0
        assert len(res["final"]["acc"]) == n_results and res["curves"], res
        assert all(0.0 <= a <= 100.0 for a in res["final"]["acc"])
        assert res["wall_time_s"] > 0 and res["config"]["args"]["preset"] == "quick"
    for name in ("accuracy.png", "summary.md"):
        assert os.path.getsize(os.path.join(folder, name)) > 0
    with open(os.path.join(folder, "accuracy.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = open(os.path.join(folder, "summary.md")).read()
    for v in variants:
        assert f"| {load_run(out, exp, v)['name']} | 1 |" in summary


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    require_mnist()
    out = str(tmp_path_factory.mktemp("split"))
    proc = run_dgr("--exp", "split", "--preset", "quick", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_split_end_to_end(split_run):
    out, proc = split_run
    check_outputs(out, "split", 5)
    res = load_run(out, "split", "gr")
    assert res["tasks"] == ["0-1", "2-3", "4-5", "6-7", "8-9"]
    assert len(res["acc_after_task"]) == 5
    assert os.path.exists(os.path.join(out, "split", "gr_seed0_samples_tasks.png"))   # Fig. 7
    assert "it/s" in proc.stdout and "ETA" in proc.stdout


def test_each_trained_generator_is_measured(split_run):
    """GR's five generators (split trains the last one too) each with the share of each class among its
    samples as its solver labels them, and the accuracy of a solver trained on them; after task 1 (digits
    0 and 1) its solver names almost only those two. Runs without a generator have none; the summary
    has a table of them, the progress a line each."""
    out, proc = split_run
    measured = load_run(out, "split", "gr")["generators"]
    assert [m["task"] for m in measured] == [1, 2, 3, 4, 5]
    for m in measured:
        assert abs(sum(m["class_share"]) - 100) < 0.1 and len(m["class_share"]) == 10
        assert 1 <= m["effective_classes"] <= 10 and 0 <= m["train_on_generated"] <= 100
    assert sum(measured[0]["class_share"][:2]) > 90 and measured[0]["effective_classes"] < 2.05
    assert measured[-1]["effective_classes"] > measured[0]["effective_classes"]
    assert all(load_run(out, "split", v)["generators"] == [] for v in ("er", "noise", "none"))
    summary = open(os.path.join(out, "split", "summary.md")).read()
    assert "| variant | after task 1 | after task 2 | after task 3 | after task 4 | after task 5 |" in summary
    assert (f"| GR | {measured[0]['train_on_generated']:.2f} ({measured[0]['effective_classes']:.1f}) |"
            in summary)
    assert proc.stdout.count("generator measured: a solver trained on its samples") == 5


def test_split_gr_beats_none(split_run):
    """Class-incremental: without replay only the last task survives (~20 %); GR keeps old classes.
    The margins leave room for the quick preset's spread between machines (reference/README.md, "Quick
    preset")."""
    out, _ = split_run
    gr, none = load_run(out, "split", "gr")["final"]["avg"], load_run(out, "split", "none")["final"]["avg"]
    er = load_run(out, "split", "er")["final"]["avg"]
    assert none < 25.0
    assert gr > none + 30.0, (gr, none)
    assert er > gr, (er, gr)   # exact replay is the upper bound


@pytest.mark.parametrize("exp,n_results", [("chain", 5), ("permuted", 3)])
def test_mnist_experiments_end_to_end(tmp_path, exp, n_results):
    require_mnist()
    proc = run_dgr("--exp", exp, "--preset", "quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    check_outputs(str(tmp_path), exp, n_results)
    if exp == "chain":
        accs = load_run(str(tmp_path), exp, "er")["final"]["acc"]
        assert accs[0] > 85 and min(accs) > 80, accs      # real inputs relabelled: the chain holds
        assert max(load_run(str(tmp_path), exp, "none")["final"]["acc"][1:]) < 30  # untrained solvers
    else:
        res = load_run(str(tmp_path), exp, "none")
        assert res["acc_after_task"][0][0] > 80           # task 1 learnt before it is forgotten


@pytest.mark.parametrize("exp", ["mnist-svhn", "svhn-mnist", "lwf"])
def test_svhn_experiments_end_to_end(tmp_path, svhn_data_dir, exp):
    proc = run_dgr("--exp", exp, "--preset", "quick", "--out", str(tmp_path), data_dir=svhn_data_dir,
                   patches=("svhn-md5",))
    assert proc.returncode == 0, proc.stderr
    check_outputs(str(tmp_path), exp, 2)
    if exp != "lwf":   # Fig. 4: generator samples at the listed generator steps, for each task
        for t in (1, 2):
            assert os.path.exists(os.path.join(tmp_path, exp, f"gr_seed0_samples_task{t}.png"))
    else:
        assert load_run(str(tmp_path), exp, "none")["name"] == "LwF"
        assert "head warm-up" in proc.stdout


@pytest.mark.parametrize("argv,message", [
    (["--exp", "bogus"], "unknown experiment bogus: choose from chain,permuted,"),
    (["--exp", "split,bogus"], "unknown experiment bogus"),
    (["--variants", "gr,foo"], "unknown variant foo"),
    (["--r", "1.5"], "--r must lie in [0, 1]"),
    (["--r", "-0.1"], "--r must lie in [0, 1]"),
    (["--seeds", "0"], "--seeds must lie in [1, 1000], got 0"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--budget", "solver_iters=-3"], "--budget: solver_iters is >= 1, got -3"),
    (["--solver-iters", "3"], "unrecognized arguments: --solver-iters"),
    (["--budget", "gan=vae"], "--budget: gan is conv or mlp, got 'vae'"),
    (["--budget", "width=wide"], "--budget: width takes an integer, got 'wide'"),
    (["--budget", "width=8,width=16"], "--budget: width is given twice"),
    (["--device", "cpu", "--graphs", "on"], "--graphs on: CUDA graphs need a CUDA device, not cpu"),
    (["--budget", "depth=3"], "--budget: 'depth=3' is not name=value with a name among solver_iters"),
    (["--budget", "gen_iters=-1"], "--budget: gen_iters is >= 1, got -1"),
    (["--budget", "batch=0"], "--budget: batch is >= 1, got 0"),
    (["--budget", "gen_lr=0"], "--budget: gen_lr is > 0, got 0.0"),
    (["--budget", "temperature=0"], "--budget: temperature is > 0, got 0.0"),
    (["--budget", "dropout=1"], "--budget: dropout is in [0, 1), got 1.0"),
    (["--budget", "lam=nan"], "--budget: lam is >= 0, got nan"),
    (["--budget", "sample_at=0:10"], "--budget: sample_at takes steps >= 1, got (0, 10)"),
])
def test_bad_input_exits_2_with_message(argv, message, tmp_path):
    proc = run_dgr(*argv, "--out", str(tmp_path))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_device_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(dgr.UsageError,
                       match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        dgr.resolve_device("cuda:2")
    assert dgr.resolve_device("cuda:1") == torch.device("cuda:1")


def test_missing_data_offline_names_folder_and_files(tmp_path):
    """Downloads go to a port that refuses them (patched_dgr.py 'offline'): the same with or without
    internet."""
    proc = run_dgr("--exp", "split", "--preset", "quick", "--out", str(tmp_path / "out"),
                   data_dir=str(tmp_path / "empty"), patches=("offline",))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "empty") in proc.stderr and "train-images-idx3-ubyte" in proc.stderr
    assert not os.path.exists(tmp_path / "empty" / "MNIST")     # the failed download leaves nothing behind


def test_missing_svhn_names_its_files(tmp_path):
    require_mnist()
    os.symlink(os.path.join(DATA, "MNIST"), tmp_path / "MNIST")
    proc = run_dgr("--exp", "lwf", "--preset", "quick", "--out", str(tmp_path / "out"),
                   data_dir=str(tmp_path), patches=("offline",))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train_32x32.mat" in proc.stderr and str(tmp_path / "SVHN") in proc.stderr
    assert not os.path.exists(tmp_path / "SVHN")


def test_help_lists_every_option():
    proc = run_dgr("--help")
    assert proc.returncode == 0
    for option in ("--exp", "--variants", "--preset", "--seeds", "--r", "--replay-targets", "--data-dir",
                   "--out", "--device"):
        assert option in proc.stdout
    text = " ".join(proc.stdout.split())   # defaults that say something are shown, empty ones are not
    assert "(default: permuted)" in text and "(default: 0)" in text
    assert "(default: None)" not in text and "(default: )" not in text and "(default: False)" not in text


def test_ewc_and_distill_variants_end_to_end(tmp_path):
    require_mnist()
    proc = run_dgr("--exp", "permuted", "--preset", "quick", "--variants", "ewc,gr+distill", "--out",
                   str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    check_outputs(str(tmp_path), "permuted", 3, variants=("ewc", "gr+distill"))
    assert load_run(str(tmp_path), "permuted", "gr+distill")["fingerprint"]["temperature"] == 2.0


@pytest.mark.parametrize("argv,message", [
    (["--exp", "chain", "--variants", "ewc"], "variant ewc applies to permuted, split, not chain"),
    (["--exp", "lwf", "--variants", "gr+distill"],
     "variant gr+distill applies to chain, permuted, mnist-svhn, svhn-mnist, split, not lwf"),
])
def test_variant_misuse_exits_2(argv, message, tmp_path):
    proc = run_dgr(*argv, "--out", str(tmp_path))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["cannot be made", "a file stands there"])
def test_unwritable_out_exits_2_before_loading_data(tmp_path, case):
    if case == "cannot be made":
        out, reason = "/proc/dgr-forbidden", "No such file or directory"
    else:
        (tmp_path / "split").write_text("a file where the experiment folder should be")
        out, reason = str(tmp_path), "File exists"
    proc = run_dgr("--exp", "split", "--preset", "quick", "--out", out, data_dir=str(tmp_path / "no-data"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"dgr.py: error: cannot write results to {os.path.join(out, 'split')} "
                                   f"({reason}); choose another --out")
    assert not os.path.exists(tmp_path / "no-data")   # refused before any data was looked for


def test_result_of_an_older_version_is_named_so(tmp_path):
    require_mnist()
    argv = ["--exp", "split", "--preset", "quick", "--variants", "none", "--out", str(tmp_path)]
    folder = tmp_path / "split"
    folder.mkdir()
    fingerprint = dgr.run_fingerprint("split", "none", 0, dgr.parse_args(argv),
                                      dgr.budget_for(dgr.parse_args(argv), "split"), CPU_RUN)
    del fingerprint["solver_lr"], fingerprint["dropout"]         # as an older dgr.py wrote it
    (folder / "none_seed0.json").write_text(json.dumps({"fingerprint": fingerprint}))
    proc = run_dgr(*argv, "--resume")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "none_seed0.json was written by another version of dgr.py " \
           "(its settings lack dropout, solver_lr); " \
           "pass --overwrite to replace it or choose another --out" in proc.stderr


def test_a_result_from_before_a_new_budget_field_is_still_the_same_run(tmp_path):
    """A Budget field added later does at its old value what dgr.py did before it: a result written without
    it is kept by --resume; another value is another run. A field its variant does not use (a GAN's for ER)
    never makes another run."""
    require_mnist()
    argv = ["--exp", "split", "--preset", "quick", "--variants", "er", "--budget", "solver_iters=20",
            "--out", str(tmp_path)]
    assert run_dgr(*argv).returncode == 0
    path = tmp_path / "split" / "er_seed0.json"
    res = json.loads(path.read_text())
    for added in ("replay_batch", "last_generator", "gan_precision"):   # as an older dgr.py had it
        del res["fingerprint"][added]
    path.write_text(json.dumps(res))
    kept = f"{tmp_path / 'split' / 'er_seed0'}.json: finished earlier, kept"
    for budget, code in (("solver_iters=20", 0), ("solver_iters=20,gen_iters=7", 0),
                         ("solver_iters=20,replay_batch=64", 2)):
        argv[-3] = budget
        proc = run_dgr(*argv, "--resume")
        assert proc.returncode == code and (kept in proc.stdout if code == 0 else
                                            "differs in: replay_batch 0 != 64" in proc.stderr), proc.stderr


def test_estimate_prints_expected_time_and_runs_nothing(tmp_path):
    proc = run_dgr("--exp", "all", "--preset", "quick", "--variants", "gr,none", "--out",
                   str(tmp_path / "out"), "--estimate", data_dir=str(tmp_path / "no-data"))
    assert proc.returncode == 0, proc.stderr
    for exp in dgr.EXPERIMENTS:
        assert f"{exp}: 2 run(s) to do, expected about " in proc.stdout
    assert "expected in all: about " in proc.stdout
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "no-data")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def simulate_eta(plans, seconds_per_step, calibrated, eval_every, log_every):
    """Drive Progress through a run with recorded seconds per step; return (ETA, true seconds left) at
    the first generator progress line, and the whole run's seconds."""
    clock = FakeClock()
    progress = dgr.Progress("sim", dgr.add_plans(plans), calibrated, clock=clock)
    timeline, first_line = [], None
    for plan in plans:
        for kind, n in plan.items():
            for step in range(1, n + 1):
                clock.now += seconds_per_step[kind]
                progress.advance(kind)
                timeline.append(clock.now)
                if first_line is None and "generator" in kind and step % log_every == 0:
                    first_line = (progress.eta(), len(timeline))
    eta, at = first_line
    return eta, timeline[-1] - timeline[at - 1]


def test_eta_is_right_from_the_first_generator_line():
    """Paper-preset split GR on 2 CPU cores, per-step seconds as measured here (solver 5 ms, with GR
    replay 30 ms, generator step with its 5 critic steps 1.1-1.4 s) and a calibration that is off
    by 30-40 % (timed on 2 steps, before the caches are warm): after the first generator progress line
    the ETA is within 25 % of the time left."""
    b = dgr.PAPER["split"]
    plans = dgr.run_plan(dgr.EXPERIMENTS["split"], dgr.VARIANTS["gr"], b)
    recorded = {"solver": 0.005, "replay solver": 0.030, "generator": 1.10, "replay generator": 1.40,
                "probe": 0.03}
    calibrated = {"solver": 0.0035, "replay solver": 0.020, "generator": 0.80, "replay generator": 0.90,
                  "probe": 0.02}
    log_every = b.gen_iters // (b.solver_iters // b.eval_every)
    eta, left = simulate_eta(plans, recorded, calibrated, b.eval_every, log_every)
    assert abs(eta - left) / left < 0.25, (eta, left)


def test_eta_leaves_out_what_happens_once():
    """The first step of a run carries its setup (here 30 s: the fused ops' first build, say) and the first
    generator step a one-time 5 s: the ETA at the first solver progress line is within 25 % of the time
    left, and stays so at the first generator line, instead of scaling every kind by the setup's delay."""
    b = dgr.FAST["permuted"]
    plans = dgr.run_plan(dgr.EXPERIMENTS["permuted"], dgr.VARIANTS["gr"], b)
    costs = {"solver": 0.007, "replay solver": 0.018, "generator": 0.049, "replay generator": 0.051,
             "probe": 0.006}
    once = {"solver": 30.0, "generator": 5.0}
    clock, steps = FakeClock(), [kind for plan in plans for kind, n in plan.items() for _ in range(n)]
    progress = dgr.Progress("sim", dgr.add_plans(plans), costs, clock=clock)
    total = sum(costs[kind] for kind in steps) + sum(once.values())
    checked = []
    for i, kind in enumerate(steps):
        clock.now += costs[kind] + once.pop(kind, 0.0)   # a kind's one-time cost, on its first step only
        progress.advance(kind)
        if (kind == "solver" and i + 1 == b.eval_every) or (kind == "generator" and len(checked) == 1):
            checked.append((progress.eta(), total - clock.now))
    assert len(checked) == 2
    for eta, left in checked:
        assert abs(eta - left) / left < 0.25, (eta, left)


def test_each_variant_is_timed_with_its_own_replay():
    """One command's runs share the step costs timed before them, but a replay solver step costs what its
    replay costs: ER's stored rows and Noise's noise are not timed as GR's generator samples, and LwF's None
    replays the current inputs; EWC's steps after its first task pay for its penalty."""
    costs = {"solver": 0.005, "replay solver (generator)": 0.030, "replay solver (stored)": 0.009,
             "replay solver (noise)": 0.008, "replay solver (current)": 0.006, "replay solver (ewc)": 0.007,
             "generator": 1.10, "replay generator": 1.40, "probe": 0.03}
    for exp, variant, source in (("split", "gr", "generator"), ("split", "er", "stored"),
                                 ("split", "noise", "noise"), ("lwf", "none", "current"),
                                 ("lwf", "er", "stored"),
                                 ("split", "ewc", "ewc"), ("permuted", "ewc", "ewc")):
        e, b = dgr.EXPERIMENTS[exp], dgr.FAST[exp]
        plan = dgr.add_plans(dgr.run_plan(e, dgr.VARIANTS[variant], b))
        assert plan["replay solver"] > 0
        seconds = sum(n * costs[f"replay solver ({source})" if kind == "replay solver" else kind]
                      for kind, n in plan.items())
        assert dgr.run_seconds(e, variant, b, costs) == pytest.approx(seconds), (exp, variant)
    plan = dgr.add_plans(dgr.run_plan(dgr.EXPERIMENTS["split"], dgr.VARIANTS["none"], dgr.FAST["split"]))
    assert set(plan) == {"solver"}   # no replay, no replay cost needed
    # a head warm-up is LwF's replay's, not EWC's
    b = dataclasses.replace(dgr.FAST["split"], warmup_iters=50)
    ewc = dgr.run_plan(dgr.EXPERIMENTS["split"], dgr.VARIANTS["ewc"], b)
    assert set(ewc[0]) == {"solver"} and all(plan == {"replay solver": b.solver_iters} for plan in ewc[1:])


def test_a_resumed_run_is_timed_from_where_it_stands():
    """Resumed mid-task (task 2 of split GR, 20 generator steps in; task 2 of LwF, past its head warm-up),
    the expected time and the ETA count only the steps left, and the ETA reaches 0 at the run's end."""
    costs = {"solver": 0.005, "replay solver": 0.030, "generator": 1.10, "replay generator": 1.40,
             "probe": 0.03}
    for exp, at, done_in_task in (("split", lambda b: (1, b.solver_iters + 20),
                                   {"replay solver": None, "replay generator": 20}),
                                  ("lwf", lambda b: (1, 30), {"solver": None, "replay solver": 30})):
        b = dgr.PAPER[exp]
        plans = dgr.run_plan(dgr.EXPERIMENTS[exp], dgr.VARIANTS["gr"], b)
        done = dgr.steps_done(plans, *at(b), b)
        expected = dgr.add_plans(plans[:1])
        for kind, n in done_in_task.items():
            expected[kind] = expected.get(kind, 0) + (plans[1][kind] if n is None else n)
        assert done == expected
        left = {kind: n - done.get(kind, 0) for kind, n in dgr.add_plans(plans).items()}
        # measured at a task's end
        assert left.get("probe", 0) == (4 * b.probe_iters if exp == "split" else 0)
        seconds = sum(n * costs[kind] for kind, n in left.items())
        assert dgr.run_seconds(dgr.EXPERIMENTS[exp], "gr", b, costs, at(b)) == pytest.approx(seconds)
        assert seconds < dgr.run_seconds(dgr.EXPERIMENTS[exp], "gr", b, costs)
        clock = FakeClock()
        progress = dgr.Progress("sim", dgr.add_plans(plans), costs, clock=clock)
        progress.skip(done)
        assert progress.eta() == pytest.approx(seconds)
        for kind, n in left.items():
            for _ in range(n):
                clock.now += costs[kind]
                progress.advance(kind)
        assert progress.eta() == 0


def test_default_preset_fits_the_machine(tmp_path):
    """Without CUDA and without --preset, the fast preset runs, and says so and why."""
    proc = run_dgr("--exp", "split", "--variants", "none", "--out", str(tmp_path), "--estimate")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("preset fast: no CUDA; the paper preset's GR takes hours per run on a CPU")
    args = dgr.parse_args(["--exp", "split", "--preset", "fast"])
    assert dgr.budget_for(args, "split") == dgr.FAST["split"] and dgr.FAST["split"].gan == "mlp"


def test_a_job_array_shares_one_out(tmp_path):
    """A cluster's job array (README): two processes at once, each its own seed (--seed-start K --seeds 1),
    into one --out; then one command with --resume keeps both and writes the summary of both seeds. Each
    seed's result is the one a single run of both seeds gives, at the same thread count."""
    require_mnist()
    import subprocess
    tiny = ["--exp", "split", "--preset", "quick", "--variants", "none", "--budget",
            "solver_iters=20,eval_every=10"]
    env = {**os.environ, "DGR_DATA": DATA, "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, "dgr.py", *tiny, "--seed-start", str(k), "--seeds", "1",
                              "--out", str(tmp_path / "shared")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    for job in jobs:
        out, err = job.communicate(timeout=600)
        assert job.returncode == 0, err
    summary = run_dgr(*tiny, "--seeds", "2", "--resume", "--out", str(tmp_path / "shared"), threads=1)
    assert summary.returncode == 0, summary.stderr
    assert summary.stdout.count("finished earlier, kept") == 2 and "| None | 2 |" in summary.stdout
    assert "| None | 2 |" in (tmp_path / "shared" / "split" / "summary.md").read_text()
    alone = run_dgr(*tiny, "--seeds", "2", "--out", str(tmp_path / "alone"), threads=1)
    assert alone.returncode == 0, alone.stderr
    for seed in (0, 1):
        assert load_run(str(tmp_path / "shared"), "split", "none", seed)["final"] == \
            load_run(str(tmp_path / "alone"), "split", "none", seed)["final"]


def test_jobs_run_variants_and_seeds_in_parallel_processes(tmp_path):
    """--jobs 2: the runs (variant x seed) go at once, a process each with half the CPU threads; each
    run's result is the one a sequential run at that thread count gives (another thread count sums in
    another order: a different computation), and the summary counts them all."""
    require_mnist()
    tiny = ["--exp", "split", "--preset", "quick", "--variants", "none,noise", "--budget",
            "solver_iters=20,eval_every=10", "--seeds", "2"]
    par = run_dgr(*tiny, "--jobs", "2", "--out", str(tmp_path / "par"), threads=2)
    seq = run_dgr(*tiny, "--out", str(tmp_path / "seq"), threads=1)
    assert par.returncode == 0 and seq.returncode == 0, par.stderr + seq.stderr
    assert "expected in all with --jobs 2" in par.stdout
    summary = (tmp_path / "par" / "split" / "summary.md").read_text()
    assert "| None | 2 |" in summary and "| Noise | 2 |" in summary
    for variant in ("none", "noise"):
        for seed in (0, 1):
            run = load_run(str(tmp_path / "par"), "split", variant, seed)
            assert run["machine"].endswith(", 1 thread")
            assert run["final"] == load_run(str(tmp_path / "seq"), "split", variant, seed)["final"]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_missing_svhn_is_named_up_front_and_the_mnist_experiments_run(tmp_path, jobs):
    """--exp all offline without SVHN (reproduce.sh's case here): before anything trains, one line names the
    experiments that cannot run and why; the MNIST ones run and get their summaries; exit 3 says some did
    not."""
    require_mnist()
    (tmp_path / "data").symlink_to(os.path.abspath(DATA))   # MNIST, no SVHN
    proc = run_dgr("--exp", "all", "--preset", "quick", "--variants", "none,noise", "--budget",
                   "solver_iters=10,eval_every=10", "--jobs", jobs, "--out", str(tmp_path / "out"),
                   data_dir=str(tmp_path / "data"), patches=("offline",))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    err = proc.stderr.splitlines()
    assert err[0].startswith("dgr.py: not running mnist-svhn, svhn-mnist, lwf: SVHN is not in "), err
    assert sum("SVHN" in line for line in err) == 1, err
    assert err[-1] == "dgr.py: stopped: mnist-svhn, svhn-mnist, lwf not run (the reason is above)", err
    assert "Traceback" not in proc.stderr and "lwf:" not in proc.stdout
    for exp in ("chain", "permuted", "split"):
        assert (tmp_path / "out" / exp / "summary.md").exists()
    assert not (tmp_path / "out" / "lwf").exists()


def test_jobs_runs_time_no_step_twice(tmp_path):
    """--jobs: the step costs are timed once, by the process that plans, and each expected time printed
    once."""
    require_mnist()
    proc = run_dgr("--exp", "split", "--preset", "quick", "--variants", "none,noise", "--budget",
                   "solver_iters=10,eval_every=10", "--jobs", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("expected about") == 1 and proc.stdout.count("expected in all") == 1
    assert proc.stdout.count("## split") == 1 and "Warning" not in proc.stderr, proc.stdout + proc.stderr


def test_no_arguments_print_the_usage_and_run_nothing(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dgr.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "python dgr.py --exp split --preset quick" in proc.stdout and "--help" in proc.stdout
    assert os.listdir(tmp_path) == []


def test_results_record_what_made_them(split_run):
    """Each result JSON names the torch version, the commit, the device and the implementation that ran."""
    out, _ = split_run
    made = load_run(out, "split", "gr")["provenance"]
    assert made["torch"] == torch.__version__ and made["device"] == "cpu" and made["impl"] in ("ext", "torch")
    assert made["impl"] == ("ext" if dgr.use_extension(torch.empty(0)) else "torch")
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert made["dgr_commit"] is None or made["dgr_commit"].startswith(head)


def fake_results(folder, variants=("gr", "none"), seeds=(0, 1, 2), preset="quick", machine="m"):
    """Results JSONs of a two-task split-like experiment, 4 solver steps per task, evaluated every 2."""
    for v in variants:
        for seed in seeds:
            final = [90.0 + seed, 95.0] if v == "gr" else [0.0, 99.0]
            curves = [{"task": "0-1", "step": s, "acc": [99.0], "avg": 99.0, "loss": 0.1} for s in (2, 4)] + \
                     [{"task": "2-3", "step": s, "acc": final, "avg": sum(final) / 2, "loss": 0.1}
                      for s in (6, 8)]
            with open(os.path.join(folder, f"{v}_seed{seed}.json"), "w") as f:
                json.dump({"exp": "split", "variant": v, "name": dgr.VARIANTS[v].name, "seed": seed,
                           "tasks": ["0-1", "2-3"], "curves": curves, "acc_after_task": [[99.0], final],
                           "final": {"acc": final, "avg": sum(final) / 2}, "wall_time_s": 1.0 + seed,
                           "machine": machine,
                           "config": {"args": {"preset": preset}, "budget": {"solver_iters": 4}},
                           "fingerprint": {"exp": "split", "variant": v, "seed": seed, "preset": preset}}, f)


def test_accuracy_figure_explains_itself(tmp_path, monkeypatch):
    """Title with experiment, preset and seeds; means with +-sd bands over seeds; dotted task boundaries;
    the average panel's axis on the variants that replay, the others named as below it; a table of finals."""
    fake_results(str(tmp_path))
    figures = []
    monkeypatch.setattr(dgr, "save_figure", lambda fig, path: figures.append(fig) or path)
    dgr.summarize_folder(str(tmp_path))
    fig, = figures
    assert fig._suptitle.get_text() == ("Split MNIST, class-incremental (Fig. 6): quick preset, seeds 0-2 "
                                        "(mean ± sd over seeds)")
    gr, none, avg, final = fig.axes
    assert gr.get_title() == "GR (3 seeds)" and len(gr.collections) == 2    # a band per task
    assert any(list(line.get_xdata()) == [4, 4] for line in gr.lines)     # the boundary after task 1
    assert avg.get_ylim()[0] > 80                                        # GR 93-99, not 0-100
    assert [t.get_text() for t in avg.get_legend().get_texts()] == ["GR", "None (final 49.5, below)"]
    cells = {c.get_text().get_text() for c in final.tables[0].get_celld().values()}
    assert {"GR", "93.00 ± 0.50", "None", "49.50 ± 0.00"} <= cells


def test_sample_grids_label_their_rows(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(dgr, "save_figure", lambda fig, path: figures.append(fig) or path)
    rows = [(k, torch.rand(10, 1, 28, 28) * 2 - 1) for k in (1, 2, 3)]
    dgr.save_sample_rows(*dgr.sample_figure("split GR seed 0", "tasks", rows), str(tmp_path / "s.png"))
    dgr.save_sample_rows(*dgr.sample_figure("mnist-svhn GR seed 0", "task2", rows), str(tmp_path / "t.png"))
    measured = [{"task": k, "train_on_generated": 90.0 + k, "effective_classes": 2.0 * k} for k in (1, 2)]
    dgr.save_sample_rows(*dgr.sample_figure("chain GR seed 0", "links", rows, measured),
                         str(tmp_path / "c.png"))
    tasks, steps, links = (fig.axes[0] for fig in figures)
    assert [t.get_text() for t in tasks.get_yticklabels()] == ["after task 1", "after task 2", "after task 3"]
    assert tasks.get_title() == "split GR seed 0: the generator's samples after each task"
    assert [t.get_text() for t in steps.get_yticklabels()] == ["step 1", "step 2", "step 3"]
    assert [t.get_text() for t in links.get_yticklabels()] == ["link 1\n91.0 %, 2.0 cl.",
                                                               "link 2\n92.0 %, 4.0 cl.", "link 3"]
    assert links.get_title().endswith("\nby each row: a solver trained on its samples (test %), "
                                      "effective classes")


def test_summary_is_mean_and_sd_over_seeds_and_plain_for_one(tmp_path):
    fake_results(str(tmp_path), variants=("gr",))
    fake_results(str(tmp_path), variants=("none",), seeds=(0,))
    text = dgr.summarize_folder(str(tmp_path))
    finals = [[90.0 + seed, 95.0] for seed in (0, 1, 2)]
    cell = lambda xs: f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"
    row = [cell([a[0] for a in finals]), cell([a[1] for a in finals]), cell([sum(a) / 2 for a in finals]),
           cell([1.0, 2.0, 3.0])]
    assert f"| GR | 3 | {' | '.join(row)} |" in text
    assert "| None | 1 | 0.00 | 99.00 | 49.50 | 1.00 |" in text   # no ± over one seed


def test_runs_from_several_machines_name_theirs(tmp_path):
    """One configuration's runs made on two machines (two nodes of a cluster) stay one table, and each row
    says on which machines its wall times were measured; a folder from one machine has no such column."""
    fake_results(str(tmp_path), variants=("gr",), seeds=(0, 1), machine="AMD EPYC CPU, 2 threads")
    fake_results(str(tmp_path), variants=("gr",), seeds=(2,), machine="Intel Xeon CPU, 1 thread")
    fake_results(str(tmp_path), variants=("none",), machine="Intel Xeon CPU, 1 thread")
    text = dgr.summarize_folder(str(tmp_path))
    assert text.startswith("## split (quick preset, several machines)\n")
    assert "| average | wall time (s) | machine |" in text
    assert "| 2.00 ± 1.00 | AMD EPYC CPU, 2 threads; Intel Xeon CPU, 1 thread |" in text     # GR's row
    assert "| 2.00 ± 1.00 | Intel Xeon CPU, 1 thread |" in text                              # None's
    one = tmp_path / "one"
    one.mkdir()
    fake_results(str(one), variants=("gr",), machine="Intel Xeon CPU, 1 thread")
    text = dgr.summarize_folder(str(one))
    assert text.startswith("## split (quick preset, Intel Xeon CPU, 1 thread)\n") and "machine |" not in text


def test_a_folder_of_two_presets_is_summarized_per_preset(tmp_path, capsys):
    """Runs of different settings in one folder are never averaged together: a table and a figure each,
    named by the setting that differs; a stray *_seed*.json that is not a result is named and left out."""
    fake_results(str(tmp_path), variants=("gr",), seeds=(0, 1), preset="quick")
    fake_results(str(tmp_path), variants=("gr",), seeds=(2,), preset="fast")
    (tmp_path / "notes_seed3.json").write_text("[1, 2")
    (tmp_path / "none_seed9.json").write_text('{"exp": "split"}')
    text = dgr.summarize_folder(str(tmp_path))
    assert "## split (quick preset, m); preset quick (accuracy.png)" in text and "| GR | 2 |" in text
    assert "## split (fast preset, m); preset fast (accuracy-2.png)" in text and "| GR | 1 |" in text
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "accuracy-2.png").exists()
    err = capsys.readouterr().err
    assert f"leaving out {tmp_path / 'notes_seed3.json'}: not a result of dgr.py (JSONDecodeError)" in err
    assert f"leaving out {tmp_path / 'none_seed9.json'}: not a result of dgr.py (no variant" in err
