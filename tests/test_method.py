"""The method through its library: the losses against hand computations, the tasks, the replay variants, the
scholar on data of any shape; and its defining behaviours, pinned: each test spies on the real training code
during a real run (in-process, real MNIST, tiny budgets) and fails on a plausible bug: a constant or
off-by-one real-data share r, a chain link that sees real data, an old scholar that moves, targets that ignore
--replay-targets or the temperature, an EWC penalty left out, LwF heads mixed up, ER replaying only the
last task, Adam moments carried across tasks."""
import copy
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import dgr
from conftest import DATA, ROOT, require_mnist

TINY = ["--preset", "quick", "--budget", "solver_iters=20,gen_iters=4,eval_every=10"]


def spy(monkeypatch, owner, name, record, before=None):
    """Replace owner.name by a wrapper that calls before(arguments by name) before each call and
    record(arguments by name, result) after it."""
    real = getattr(owner, name)
    signature = inspect.signature(real)

    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if before:
            before(bound.arguments)
        out = real(*args, **kwargs)
        if record:
            record(bound.arguments, out)
        return out
    monkeypatch.setattr(owner, name, wrapper)


def run_main(tmp_path, *argv, data_dir=None):
    require_mnist()
    code = dgr.main(["--out", str(tmp_path), "--data-dir", data_dir or DATA, *TINY, *argv])
    assert code == 0


def weights(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def real_tasks(calls):
    """Calls made while training (the ETA's calibration before a run trains on a task named so)."""
    return [c for c in calls if c["task"].name != "calibration"]




@pytest.mark.parametrize("r", [None, 0.3])
def test_real_share_reaches_solver_and_generator_of_each_task(tmp_path, monkeypatch, r):
    """Task i (1-based) trains solver and generator with real share 1/i, or --r after the first task."""
    solver_r, gen_r = {}, {}
    spy(monkeypatch, dgr, "solver_step", lambda a, _: solver_r.setdefault(a["task"].name, set()).add(a["r"]))
    spy(monkeypatch, dgr, "generator_inputs",
        lambda a, _: gen_r.setdefault(a["task"].name, set()).add(a["r"]))
    run_main(tmp_path, "--exp", "split", "--variants", "gr", *(["--r", str(r)] if r is not None else []))
    names = [f"{a}-{b}" for a, b in dgr.SPLIT_CLASSES]
    want = {name: {1.0 if i == 0 else (r if r is not None else 1.0 / (i + 1))}
            for i, name in enumerate(names)}
    assert {k: v for k, v in solver_r.items() if k in names} == want
    assert {k: v for k, v in gen_r.items() if k in names} == want   # split trains the last generator too


def test_the_last_generator_is_a_choice_that_changes_no_accuracy(tmp_path, monkeypatch):
    """last_generator=skip leaves out the one generator no task replays (split's fifth): four generators
    trained, measured and shown instead of five, and the solvers' numbers as they were."""
    results = {}
    for choice in ("train", "skip"):
        trains = []
        spy(monkeypatch, dgr, "train_task", lambda a, _: trains.append(a["train_generator"]))
        run_main(tmp_path / choice, "--exp", "split", "--variants", "gr",
                 "--budget", f"last_generator={choice}")
        results[choice] = json.loads((tmp_path / choice / "split" / "gr_seed0.json").read_text()), trains
        monkeypatch.undo()
    (train, trains_train), (skip, trains_skip) = results["train"], results["skip"]
    assert trains_train == [True] * 5 and trains_skip == [True] * 4 + [False]
    assert [g["task"] for g in skip["generators"]] == [1, 2, 3, 4] and len(train["generators"]) == 5
    assert skip["acc_after_task"] == train["acc_after_task"] and skip["curves"] == train["curves"]
    assert dgr.FAST["split"].last_generator == "skip" and dgr.PAPER["split"].last_generator == "train"


def test_replay_batch_sets_the_replayed_inputs_of_every_solver_step(tmp_path, monkeypatch):
    """--budget replay_batch=24: each solver step of GR and ER replays 24 inputs beside its real batch."""
    sizes = set()
    spy(monkeypatch, dgr.Replay, "inputs", lambda a, out: sizes.add(len(out)))
    run_main(tmp_path, "--exp", "split", "--variants", "gr,er", "--budget", "replay_batch=24")
    assert sizes == {24}


def test_generator_learns_the_r_mix_of_real_and_old_samples(tmp_path, monkeypatch):
    """On task i the generator's 'real' batch holds round(r*n) real inputs, the rest old samples."""
    seen = {}

    def record(a, x):
        if a["task"].name != "calibration":
            real = a["task"].x_train.flatten(1)
            n_real = sum(bool((real == row).all(1).any()) for row in x.flatten(1))
            seen.setdefault(a["task"].name, set()).add((n_real, len(x)))
    spy(monkeypatch, dgr, "generator_inputs", record)
    run_main(tmp_path, "--exp", "split", "--variants", "gr")
    n = dgr.QUICK["split"].gen_batch
    assert seen == {name: {(round(n / (i + 1)), n)}
                    for i, name in enumerate(f"{a}-{b}" for a, b in dgr.SPLIT_CLASSES)}


def test_chain_link_learns_only_from_the_previous_link(tmp_path, monkeypatch):
    """Link 1 learns MNIST (r = 1); link k > 1 learns only from link k-1's samples and labels (r = 0):
    its replay's old scholar is link k-1 as it ended, its generator sees no real input."""
    links, gen_r = [], {}

    def on_solver_step(a, _):
        if a["task"].name == "calibration":
            return
        if not links or links[-1]["s"] is not a["s"]:
            old = a["replay"].old
            links.append({"s": a["s"], "r": set(), "old": weights(old.solver) if old is not None else None,
                          "kind": a["replay"].source})
        links[-1]["r"].add(a["r"])
        links[-1]["end"] = weights(a["s"].solver)
    spy(monkeypatch, dgr, "solver_step", on_solver_step)
    spy(monkeypatch, dgr, "generator_inputs",
        lambda a, _: a["task"].name != "calibration" and gen_r.setdefault(len(links), set()).add(a["r"]))
    run_main(tmp_path, "--exp", "chain", "--variants", "gr")
    assert len(links) == 5
    assert links[0]["r"] == {1.0} and links[0]["old"] is None
    for k in range(1, 5):
        assert links[k]["r"] == {0.0} and links[k]["kind"] == "generator"
        assert torch.equal(links[k]["old"], links[k - 1]["end"]), k
    assert gen_r == {1: {1.0}, 2: {0.0}, 3: {0.0}, 4: {0.0}}   # the last link's generator serves no one


@pytest.mark.parametrize("init", ["fresh", "previous"])
def test_chain_links_start_fresh_or_from_the_previous_link(tmp_path, monkeypatch, init):
    """--budget chain_init: a link's scholar starts from new weights (fresh, the default: only the samples
    and labels pass knowledge on) or continues the previous link's (previous: its solver's first step
    starts from the weights that the replayed, frozen scholar holds)."""
    starts = {}   # the old scholar of each link -> (the scholar trained, its solver's weights before step 1)

    def before_solver_step(a):
        old = a["replay"].old
        if a["task"].name != "calibration" and id(old) not in starts:
            starts[id(old)] = (a["s"], weights(a["s"].solver), old)
    spy(monkeypatch, dgr, "solver_step", None, before=before_solver_step)
    run_main(tmp_path, "--exp", "chain", "--variants", "gr", "--budget", f"chain_init={init}")
    links = list(starts.values())
    assert len(links) == 5 and links[0][2] is None
    for scholar, start, old in links[1:]:
        assert (scholar is links[0][0]) == (init == "previous")
        assert torch.equal(start, weights(old.solver)) == (init == "previous")


def test_chain_gr_passes_knowledge_down_the_links(tmp_path):
    """A small MLP GAN (300 steps per link): every link answers far above chance (10 %) from samples alone,
    solver 5 too."""
    require_mnist()
    assert dgr.main(["--out", str(tmp_path), "--data-dir", DATA, "--preset", "quick", "--exp", "chain",
                     "--variants", "gr", "--budget",
                     "gan=mlp,width=64,n_critic=3,gen_lr=1e-3,critic_lr=2e-3,gen_batch=64,"
                     "gen_iters=300,solver_iters=300,eval_every=300"]) == 0
    with open(os.path.join(tmp_path, "chain", "gr_seed0.json")) as f:
        accs = json.load(f)["final"]["acc"]
    assert accs[0] > 80 and min(accs[1:]) > 50, accs


def test_old_scholar_does_not_change_during_a_task(tmp_path, monkeypatch):
    seen = {}

    def record(a, _):
        old = a["replay"].old
        if old is not None and a["task"].name != "calibration":
            seen.setdefault(a["task"].name, []).append((weights(old.solver), weights(old.generator)))
    spy(monkeypatch, dgr, "solver_step", record)
    spy(monkeypatch, dgr, "generator_inputs", record)
    run_main(tmp_path, "--exp", "split", "--variants", "gr")
    assert len(seen) == 4
    for name, states in seen.items():
        assert all(torch.equal(s, states[0][0]) and torch.equal(g, states[0][1]) for s, g in states), name


def test_replayed_generator_is_the_running_average_of_the_trained_one(tmp_path, monkeypatch):
    """--budget gen_ema=d: the next task replays the average of the generator's weights after each step of
    the task, weight max(1/k, 1-d) on step k (a mean that restarts with each task, then an exponential
    average); the critic's fakes come from the generator in training."""
    decay, task, trained, replayed = 0.6, [None], {}, {}

    def on_task(a):
        task[0] = a["task"].name
        if a["replay"].old is not None:
            replayed[a["task"].name] = weights(a["replay"].old.generator)
    def on_generator_step(a, _):
        if task[0]:   # not the ETA's calibration
            trained.setdefault(task[0], []).append(weights(a["s"].generator))
    critic_steps, fakes_of_trained = [], []
    spy(monkeypatch, dgr, "train_task", None, on_task)
    spy(monkeypatch, dgr, "generator_step", on_generator_step)
    spy(monkeypatch, dgr, "critic_step", None, lambda a: critic_steps.append(1))
    spy(monkeypatch, dgr.Scholar, "sample", None, lambda a: a["trained"] and fakes_of_trained.append(1))
    run_main(tmp_path, "--exp", "split", "--variants", "gr", "--budget", f"gen_ema={decay}")
    names = [f"{a}-{b}" for a, b in dgr.SPLIT_CLASSES]
    assert list(trained) == names and list(replayed) == names[1:]
    assert len(fakes_of_trained) == len(critic_steps) > 0
    for name, next_name in zip(names, names[1:]):
        average = trained[name][0]
        for k, w in enumerate(trained[name][1:], 2):
            average = average + max(1 / k, 1 - decay) * (w - average)
        torch.testing.assert_close(replayed[next_name], average)
        assert not torch.allclose(replayed[next_name], trained[name][-1])
    s = dgr.Scholar((1, 28, 28), dgr.Budget(gan="mlp", width=8, gen_ema=decay))
    s.average_generator(decay, 1)
    torch.nn.init.normal_(s.generator.net[0].weight)   # a training step, as far as the average knows
    for trained_fakes, generator in ((True, s.generator), (False, s.generator_ema)):
        torch.manual_seed(0)
        x = s.sample(4, trained=trained_fakes)
        torch.manual_seed(0)
        assert torch.equal(x, generator(torch.randn(4, s.z_dim)))
    torch.manual_seed(0)
    assert not torch.equal(x, s.generator(torch.randn(4, s.z_dim)))


@pytest.mark.parametrize("argv,soft,temperature", [
    (["--variants", "gr"], False, 1.0),
    (["--variants", "gr", "--replay-targets", "soft"], True, 1.0),
    (["--variants", "gr+distill", "--budget", "temperature=3"], True, 3.0),
])
def test_replay_targets_reach_the_solver(tmp_path, monkeypatch, argv, soft, temperature):
    labels, targets, task = set(), set(), {}
    training = lambda: task.get("name") not in (None, "calibration", "measuring")   # the ETA's timing steps
    spy(monkeypatch, dgr, "solver_step", None, before=lambda a: task.update(name=a["task"].name))   # and the
    spy(monkeypatch, dgr, "measure_generator", None, before=lambda a: task.update(name="measuring"))   # probe
    spy(monkeypatch, dgr.Scholar, "label",
        lambda a, _: training() and labels.add((a["soft"], a["temperature"])))
    spy(monkeypatch, dgr, "replay_loss", lambda a, _: training() and len(a["logits_replay"])
        and targets.add(a["targets_replay"].dtype.is_floating_point))
    run_main(tmp_path, "--exp", "permuted", *argv)
    assert labels == {(soft, temperature)} and targets == {soft}


def test_ewc_penalty_is_in_the_loss_and_holds_important_weights(tmp_path, monkeypatch, mnist):
    penalties = []
    spy(monkeypatch, dgr, "ewc_penalty", lambda a, out: penalties.append(float(out.detach())))
    run_main(tmp_path, "--exp", "permuted", "--variants", "ewc")
    assert penalties and max(penalties) > 0   # tasks 2 and 3 add it to the solver's loss

    # then: from the same start, training on task B with the penalty moves the weights that task A's
    # Fisher marks as important less than training without it
    torch.manual_seed(0)
    b = dgr.Budget(hidden=64, fisher_samples=200, ewc_lambda=1000.0)
    tasks = dgr.permuted_tasks(mnist, dataclasses_replace(b, n_tasks=2, train_limit=2000, test_limit=10),
                               seed=0)
    s = dgr.Scholar((1, 28, 28), b, with_generator=False)
    train(s, tasks[0], dgr.Replay(), 150)
    ewc = dgr.ewc_update(None, s.solver, tasks[0], b)
    drift = {}
    for name, replay in (("none", dgr.Replay()), ("ewc", dgr.Replay(ewc=ewc))):
        torch.manual_seed(1)
        t = copy_scholar(s, b)
        train(t, tasks[1], replay, 150)
        drift[name] = sum(float((f * (p.detach() - a) ** 2).sum())
                          for p, f, a in zip(t.solver.parameters(), ewc["fisher"], ewc["anchor"]))
    assert drift["ewc"] < 0.5 * drift["none"], drift


def test_lwf_warm_up_trains_only_the_new_head_and_each_task_uses_its_head(tmp_path, monkeypatch,
                                                                          svhn_data_dir):
    from torchvision.datasets import SVHN
    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)
    warmups, heads = [], set()
    real_warm_up = dgr.warm_up_head

    def warm_up(*args, **kwargs):
        s = args[0]
        before = [weights(m) for m in (s.solver.trunk, s.solver.heads[0], s.solver.heads[1])]
        out = real_warm_up(*args, **kwargs)
        after = [weights(m) for m in (s.solver.trunk, s.solver.heads[0], s.solver.heads[1])]
        warmups.append([not torch.equal(x, y) for x, y in zip(before, after)])
        return out
    monkeypatch.setattr(dgr, "warm_up_head", warm_up)
    spy(monkeypatch, dgr, "accuracy", lambda a, _: heads.update((t.name, t.head) for t in a["tasks"]))
    run_main(tmp_path, "--exp", "lwf", "--variants", "gr,none", data_dir=svhn_data_dir)
    assert warmups == [[False, False, True]] * 2   # one warm-up per run, on task 2: only head 1 moves
    assert heads == {("svhn", 0), ("mnist", 1)}


def test_er_replays_every_past_task(tmp_path, monkeypatch):
    pools = {}
    spy(monkeypatch, dgr, "solver_step",
        lambda a, _: a["task"].name != "calibration"
        and pools.setdefault(a["task"].name, set()).add(len(a["replay"].pool)))
    run_main(tmp_path, "--exp", "split", "--variants", "er")
    assert pools == {"0-1": {0}, "2-3": {1}, "4-5": {2}, "6-7": {3}, "8-9": {4}}


@pytest.mark.parametrize("draw", ["stored_rows_by_task", "stored_rows_in_place"])
def test_er_draws_past_tasks_evenly_and_their_inputs_uniformly(draw):
    """Both ER draws (by task on the CPU; in place, with no host synchronisation, on CUDA) give each past
    task 1/K of the rows and each input of a task the same chance, whatever the tasks' sizes."""
    sizes = (50, 200, 1000)
    pool = [torch.stack([torch.full((1, 2, 2), 1000.0 * k + i) for i in range(m)])
            for k, m in enumerate(sizes)]
    torch.manual_seed(0)
    rows = getattr(dgr, draw)(pool, 30000)
    assert rows.shape == (30000, 1, 2, 2) and torch.equal(rows, rows[:, :1, :1, :1].expand_as(rows))
    ids = rows[:, 0, 0, 0].long()
    task, index = ids // 1000, ids % 1000
    for k, m in enumerate(sizes):
        share = float((task == k).float().mean())
        assert abs(share - 1 / 3) < 0.015, (k, share)
        mine = index[task == k]
        assert int(mine.max()) < m and len(mine.unique()) > 0.95 * m
        halves = float((mine < m // 2).float().mean())
        assert abs(halves - 0.5) < 0.03, (k, halves)


def test_solver_adam_restarts_on_each_task(tmp_path, monkeypatch):
    """After the first solver step of every task, Adam has counted one step: its moments start afresh."""
    first = {}
    spy(monkeypatch, dgr, "solver_step", lambda a, _: a["task"].name != "calibration" and first.setdefault(
        a["task"].name, {float(state["step"]) for state in a["opt"].state.values()}))
    run_main(tmp_path, "--exp", "permuted", "--variants", "gr")
    assert first == {"perm1": {1.0}, "perm2": {1.0}, "perm3": {1.0}}


@pytest.mark.parametrize("gan", ["conv", "mlp"])
def test_critic_step_is_the_wgan_gp_step_of_one_batch(mnist, gan):
    """critic_step scores the interpolates apart from the real and fake inputs: three steps of it move the
    critic as the one-batch WGAN-GP step does (the benchmark's control), loss and weights alike."""
    from bench_ops import critic_step_one_batch
    b = dgr.Budget(gan=gan, width=16)
    torch.manual_seed(0)
    split = dgr.Scholar((1, 28, 28), b)
    one_batch = copy.deepcopy(split)
    opts = [dgr.adam(s.critic, 1e-3, (0.5, 0.9)) for s in (split, one_batch)]
    x = mnist[0][:32]
    for step in range(3):
        losses = []
        for s, opt, critic_step in zip((split, one_batch), opts, (dgr.critic_step, critic_step_one_batch)):
            torch.manual_seed(step)   # the same fake samples and interpolation weights for both
            losses.append(critic_step(s, opt, x, 10.0))
        torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(weights(split.critic), weights(one_batch.critic))
    assert not torch.equal(weights(split.critic), weights(dgr.Scholar((1, 28, 28), b).critic))


@pytest.mark.parametrize("gan", ["conv", "mlp"])
def test_gan_precision_bf16_computes_the_gan_steps_in_bf16(mnist, gan):
    """--budget gan_precision=bf16 (a GPU speed lever): the critic's and the generator's layers compute in
    bf16 within gan_iteration, their weights and Adam's moments stay fp32, and three iterations train (finite
    losses, moved weights) near where fp32 goes; the default fp32 computes in fp32."""
    moved = {}
    for precision in ("fp32", "bf16"):
        b = dgr.Budget(gan=gan, width=16, gen_batch=16, n_critic=2, gan_precision=precision)
        torch.manual_seed(0)
        s = dgr.Scholar((1, 28, 28), b)
        start = [weights(s.critic), weights(s.generator)]
        opts = s.optimizers(b)
        seen = set()
        hooks = [m.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
                 for net in (s.critic, s.generator) for m in net.modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        for step in range(3):
            torch.manual_seed(step)
            losses = dgr.gan_iteration(s, opts, b, lambda: mnist[0][:16])
            assert all(torch.isfinite(loss) for loss in losses.values()), losses
        for h in hooks:
            h.remove()
        assert seen == ({torch.bfloat16} if precision == "bf16" else {torch.float32}), seen
        assert all(p.dtype == torch.float32 for p in s.parameters())
        assert all(v.dtype == torch.float32 for opt in (opts["critic"], opts["generator"])
                   for state in opt.state.values() for v in state.values() if v.is_floating_point())
        moved[precision] = [weights(s.critic) - start[0], weights(s.generator) - start[1]]
    for fp32, bf16 in zip(moved["fp32"], moved["bf16"]):
        assert bf16.abs().sum() > 0 and not torch.equal(fp32, bf16)
        assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > 0.8   # the same steps, rounded


def test_cpu_adam_is_torchs_default_adam_bit_for_bit(mnist):
    """dgr.adam on the CPU is torch's default Adam: its steps (an lr changed between them, as the cosine
    schedule does) equal the default's exactly, the arithmetic of the committed CPU results (the fused CPU
    kernel rounds otherwise; reference/README.md has its measured speed)."""
    b = dgr.Budget(gan="mlp", width=32)
    torch.manual_seed(0)
    ours = dgr.Scholar((1, 28, 28), b)
    default = copy.deepcopy(ours)
    opts = [dgr.adam(ours.critic, 2e-4, (0.5, 0.9)),
            torch.optim.Adam(default.critic.parameters(), 2e-4, (0.5, 0.9))]
    for step in range(4):
        for s, opt in zip((ours, default), opts):
            dgr.set_lr(opt, 2e-4 * (4 - step) / 4)
            torch.manual_seed(step)
            dgr.critic_step(s, opt, mnist[0][:32], 10.0)
    assert torch.equal(weights(ours.critic), weights(default.critic))
    assert not torch.equal(weights(ours.critic), weights(dgr.Scholar((1, 28, 28), b).critic))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedules_hold_within_each_task(mnist, monkeypatch, schedule):
    """solver_schedule and gan_schedule: each step's lr is the base lr times a half cosine over the task's
    steps (1 at its first step, near 0 at its last), restarting with each task; constant keeps it."""
    b = dgr.Budget(solver_iters=6, gen_iters=4, n_critic=2, batch=16, gen_batch=8, gan="mlp", width=8,
                   hidden=16, gen_lr=2e-4, critic_lr=4e-4, solver_lr=3e-4, solver_schedule=schedule,
                   gan_schedule=schedule)
    tasks = dgr.split_tasks(mnist, dataclasses_replace(b, train_limit=200, test_limit=50), seed=0)[:2]
    seen = {"solver": [], "critic": [], "generator": []}
    lr = lambda opt: float(opt.param_groups[0]["lr"])
    spy(monkeypatch, dgr, "solver_step", None, lambda a: seen["solver"].append(lr(a["opt"])))
    spy(monkeypatch, dgr, "critic_step", None, lambda a: seen["critic"].append(lr(a["opt"])))
    spy(monkeypatch, dgr, "generator_step", None, lambda a: seen["generator"].append(lr(a["opt"])))
    s = dgr.Scholar((1, 28, 28), b)
    opts = s.optimizers(b)
    for i, task in enumerate(tasks):
        replay = dgr.make_replay(dgr.VARIANTS["gr"], False, s.frozen_copy() if i else None, [], 0, None)
        dgr.train_task(s, opts, task, replay, 1.0 / (i + 1), b)
    factor = (lambda k, n: dgr.cosine(k, n)) if schedule == "cosine" else (lambda k, n: 1.0)
    per_task = lambda lr0, n, repeat=1: [lr0 * factor(k, n) for k in range(1, n + 1)
                                         for _ in range(repeat)] * 2
    assert seen["solver"] == pytest.approx(per_task(3e-4, 6))
    assert seen["critic"] == pytest.approx(per_task(4e-4, 4, repeat=2))
    assert seen["generator"] == pytest.approx(per_task(2e-4, 4))
    if schedule == "cosine":
        assert seen["solver"][0] == pytest.approx(3e-4) and seen["solver"][5] < 0.1 * 3e-4


# ---------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def mnist():
    require_mnist()
    return dgr.load_mnist(DATA, torch.device("cpu"))


def dataclasses_replace(b, **changes):
    import dataclasses
    return dataclasses.replace(b, **changes)


def copy_scholar(s, b):
    t = dgr.Scholar((1, 28, 28), b, with_generator=False)
    t.load_state_dict(s.state_dict())
    return t


def train(s, task, replay, steps):
    """Plain solver training on one task (a fresh Adam, as each task of a run)."""
    opt = torch.optim.Adam(s.solver.parameters(), lr=1e-3)
    for _ in range(steps):
        dgr.solver_step(s, opt, task, replay, 1.0, 64)


def test_readme_reuse_example_runs(mnist):
    """The README's "Reusing the scholar" code, run as written (smaller budgets) on two split tasks."""
    from conftest import ROOT
    text = open(os.path.join(ROOT, "README.md")).read()
    code = text.split("## Reusing the scholar")[1].split("```python")[1].split("```")[0]
    assert 'b = dgr.FAST["split"]' in code
    code = code.replace('dgr.FAST["split"]',
                        'dgr.Budget(solver_iters=40, gen_iters=3, gan="mlp", width=8, hidden=32)')
    printed = []
    my_tasks = dgr.split_tasks(mnist, dgr.Budget(train_limit=500, test_limit=200), seed=0)[:2]
    exec(code, {"my_tasks": my_tasks, "print": lambda *a: printed.append(a)})
    assert [name for name, _ in printed] == ["0-1", "2-3"]
    assert len(printed[1][1]) == 2 and printed[0][1][0] > 90   # task 1 learnt


# ---------------------------------------------------------------------------------------------- your own data

def pattern_tasks(shape=(3, 16, 16), n_classes=4, n=400, seed=0):
    """Class-incremental tasks of two classes each on data that is not MNIST: each class a smooth random
    colour pattern of its own, at a random contrast, with pixel noise; inputs in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    templates = torch.nn.functional.interpolate(torch.rand(n_classes, c, 4, 4, generator=g) * 2 - 1,
                                                size=(h, w), mode="bilinear", align_corners=False)

    def draw(k, m):
        contrast = torch.rand(m, 1, 1, 1, generator=g) * 0.4 + 0.6
        return (templates[k] * contrast + 0.3 * torch.randn(m, c, h, w, generator=g)).clamp(-1, 1)
    tasks = []
    for first in range(0, n_classes, 2):
        parts = [(draw(k, n), draw(k, n // 4), k) for k in (first, first + 1)]
        tasks.append(dgr.Task(f"{first}-{first + 1}", torch.cat([p[0] for p in parts]),
                              torch.cat([torch.full((n,), k) for *_, k in parts]),
                              torch.cat([p[1] for p in parts]),
                              torch.cat([torch.full((n // 4,), k) for *_, k in parts])))
    return tasks


def learn_tasks(tasks, b, shape, n_classes, replay_kind):
    """The README's reuse loop: a scholar learns `tasks` one after another; accuracy on all of them after."""
    torch.manual_seed(0)
    scholar = dgr.Scholar(shape, b, n_classes=n_classes)
    opts = scholar.optimizers(b)
    for i, task in enumerate(tasks):
        replay = (dgr.Replay() if i == 0 or replay_kind == "none"
                  else dgr.Replay("generator", scholar.frozen_copy()))
        dgr.train_task(scholar, opts, task, replay, r=1 / (i + 1), b=b)
    return dgr.accuracy(scholar.solver, tasks)


def test_gr_through_the_library_on_data_that_is_not_mnist():
    """3x16x16 colour patterns in 4 classes, two class-incremental tasks, the fast preset's kind of GAN at
    small budgets: without replay the first task is forgotten; generative replay keeps it."""
    tasks = pattern_tasks()
    b = dgr.Budget(solver_iters=150, gen_iters=150, n_critic=3, gan="mlp", width=64, hidden=64, batch=64,
                   gen_batch=64, gen_lr=8e-4, critic_lr=1.6e-3)
    none = learn_tasks(tasks, b, (3, 16, 16), 4, "none")
    gr = learn_tasks(tasks, b, (3, 16, 16), 4, "gr")
    assert none[0] < 10 and none[1] > 90, none
    assert gr[0] > 80 and gr[1] > 80, gr


def test_measuring_a_generator_on_data_that_is_not_mnist():
    """A generator that learnt two of four pattern classes: its solver labels its samples as those two
    about evenly, and a solver trained only on them recognises the real test patterns; measuring leaves the
    scholar and the random stream as they were."""
    task = pattern_tasks()[0]
    b = dgr.Budget(solver_iters=150, gen_iters=150, n_critic=3, gan="mlp", width=64, hidden=64, batch=64,
                   gen_batch=64, gen_lr=8e-4, critic_lr=1.6e-3, probe_iters=100)
    torch.manual_seed(0)
    scholar = dgr.Scholar((3, 16, 16), b, n_classes=4)
    dgr.train_task(scholar, scholar.optimizers(b), task, dgr.Replay(), r=1.0, b=b)
    before, rng = copy.deepcopy(scholar.state_dict()), torch.get_rng_state()
    m = dgr.measure_generator(scholar, [task], b)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, scholar.state_dict()[k]) for k, v in before.items())
    assert sum(m["class_share"][:2]) > 99 and min(m["class_share"][:2]) > 25, m
    assert 1.6 < m["effective_classes"] <= 2.0 and m["train_on_generated"] > 90, m


def test_measuring_generators_changes_nothing_a_run_learns(mnist):
    """A split run with its generators measured learns exactly what it learns without: the same curves,
    accuracies and samples."""
    b = dgr.Budget(**{**dgr.QUICK_COMMON, "solver_iters": 30, "gen_iters": 10, "eval_every": 10})
    runs = [dgr.run_one(dgr.EXPERIMENTS["split"], "gr", 0, {"mnist": mnist},
                        dataclasses_replace(b, probe_iters=k))
            for k in (0, 15)]
    assert runs[0]["generators"] == [] and [m["task"] for m in runs[1]["generators"]] == [1, 2, 3, 4, 5]
    for key in ("curves", "acc_after_task", "final"):
        assert runs[0][key] == runs[1][key]
    assert all(torch.equal(x, y)
               for (_, x), (_, y) in zip(runs[0]["samples"]["tasks"], runs[1]["samples"]["tasks"]))


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 9, 13), (2, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 48)])
@pytest.mark.parametrize("gan", ["conv", "mlp"])
def test_scholar_fits_any_image_size_and_class_count(shape, gan):
    """Both GANs generate inputs of the scholar's shape and the critic scores them; the solver has the
    classes asked for; one task of each step kind trains."""
    torch.manual_seed(0)
    b = dgr.Budget(solver_iters=2, gen_iters=2, n_critic=1, gan=gan, width=4, hidden=8, cnn_channels=4,
                   batch=4, gen_batch=4)
    s = dgr.Scholar(shape, b, n_classes=7)
    x = s.sample(3)
    assert x.shape == (3, *shape) and x.abs().max() <= 1
    assert s.critic(x).shape == (3, 1) and s.solver(x).shape == (3, 7)
    task = dgr.Task("t", torch.rand(16, *shape) * 2 - 1, torch.arange(16) % 7, torch.rand(4, *shape) * 2 - 1,
                    torch.arange(4))
    dgr.train_task(s, s.optimizers(b), task, dgr.Replay("generator", s.frozen_copy()), 0.5, b)


def test_the_paper_shapes_keep_their_networks():
    """28x28 and 32x32 keep the DCGAN layers they had (128x7x7 and 256x4x4 starts, 4x4x256 critic maps)."""
    b = dgr.Budget()
    for shape, start in (((1, 28, 28), (7, 7)), ((3, 32, 32), (4, 4))):
        s = dgr.Scholar(shape, b)
        assert s.generator.start == start
        convs = [m for m in s.critic if isinstance(m, torch.nn.Conv2d)]
        assert [(m.out_channels, m.kernel_size[0]) for m in convs] == [(64, 4), (128, 4),
                                                                       (256, 3 if shape[1] == 28 else 4)]
        assert s.critic[-1].in_features == 256 * 16


def test_vectors_train_with_the_fully_connected_gan():
    torch.manual_seed(0)
    b = dgr.Budget(solver_iters=3, gen_iters=2, n_critic=1, gan="mlp", width=8, hidden=8, batch=4,
                   gen_batch=4)
    s = dgr.Scholar((20,), b, n_classes=3)
    task = dgr.Task("v", torch.rand(12, 20) * 2 - 1, torch.arange(12) % 3, torch.rand(3, 20) * 2 - 1,
                    torch.arange(3))
    dgr.train_task(s, s.optimizers(b), task, dgr.Replay("generator", s.frozen_copy()), 0.5, b)
    assert s.sample(2).shape == (2, 20)
    with pytest.raises(ValueError, match=r"the conv GAN needs images of shape \(C, H, W\), got \(20,\)"):
        dgr.Scholar((20,), dgr.Budget(gan="conv"))


def bad_library_input(case):
    """Build what `case` names, with one thing wrong."""
    b = dgr.Budget(solver_iters=2, gen_iters=1, n_critic=1, gan="mlp", width=4, hidden=8, batch=4,
                   gen_batch=4)
    s = dgr.Scholar((1, 8, 8), b, n_classes=3)
    x, y = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    task = lambda **kw: dgr.Task(**{"name": "t", "x_train": x, "y_train": y, "x_test": x, "y_test": y, **kw})
    train = lambda t=None, replay=None, r=0.5, scholar=s, opts=None: dgr.train_task(
        scholar, opts if opts is not None else scholar.optimizers(b), t or task(), replay or dgr.Replay(),
        r, b)
    return {
        "pixels in [0, 255]": lambda: task(
            x_train=torch.zeros_like(x).index_fill_(0, torch.tensor([1]), 255.0)),
        "NaN input": lambda: task(x_train=x.clone().fill_(float("nan"))),
        "float labels": lambda: task(y_train=y.float()),
        "more labels than inputs": lambda: task(y_train=torch.cat([y, y])),
        "no inputs": lambda: task(x_train=x[:0], y_train=y[:0]),
        "label beyond the classes": lambda: train(task(y_train=y + 1)),
        "another shape": lambda: train(task(x_train=x[:, :, :7], x_test=x[:, :, :7])),
        "float64 inputs": lambda: train(task(x_train=x.double(), x_test=x.double())),
        "a replay source typo": lambda: dgr.Replay("generatr", s.frozen_copy()),
        "replay without the old scholar": lambda: dgr.Replay("generator"),
        "generator replay without a generator": lambda: dgr.Replay(
            "generator", dgr.Scholar((1, 8, 8), b, n_classes=3, with_generator=False)),
        "r out of range": lambda: train(r=1.5),
        "one class": lambda: dgr.Scholar((1, 8, 8), b, n_classes=1),
        "a 4x4 image": lambda: dgr.Scholar((1, 4, 4), b),
        "a zero batch": lambda: dgr.Budget(batch=0),
        "negative solver steps": lambda: dgr.Budget(solver_iters=-1),
        "missing optimizers": lambda: train(opts={"solver": s.optimizers(b)["solver"]}),
    }[case]


@pytest.mark.parametrize("case,message", [
    ("pixels in [0, 255]", r"x_train lies in \[0, 255\]; inputs must lie in \[-1, 1\]"),
    ("NaN input", "x_train holds NaN values"),
    ("float labels", "y_train must be int64 labels"),
    ("more labels than inputs", "must be as long and on one device, got 6 inputs on cpu and 12 labels"),
    ("no inputs", "has no training inputs"),
    ("label beyond the classes", r"has label 3, the scholar's solver has 3 classes \(0..2\)"),
    ("another shape", r"has inputs of shape \(1, 7, 8\), the scholar was made for \(1, 8, 8\)"),
    ("float64 inputs", "is torch.float64 on cpu, the scholar torch.float32 on cpu"),
    ("a replay source typo",
     "unknown replay source 'generatr': choose from generator, stored, noise, current, none"),
    ("replay without the old scholar", "needs the previous scholar"),
    ("generator replay without a generator", "needs a previous scholar with a generator"),
    ("r out of range", r"r must lie in \[0, 1\], got 1.5"),
    ("one class", "n_classes must be an integer >= 2"),
    ("a 4x4 image", r"input shape must be \(C, H, W\) with H, W >= 8"),
    ("a zero batch", "Budget.batch is >= 1, got 0"),
    ("negative solver steps", "Budget.solver_iters is >= 1, got -1"),
    ("missing optimizers", "opts must hold the optimizers solver, generator, critic"),
])
def test_the_library_refuses_what_does_not_fit_with_a_reason(case, message):
    with pytest.raises(ValueError, match=message):
        bad_library_input(case)()


# ------------------------------------------------------------------------------------ losses, tasks, variants

def test_svhn_loader_reads_mat_format(svhn_data_dir, monkeypatch):
    from torchvision.datasets import SVHN
    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)
    x, y, xt, yt = dgr.load_svhn(svhn_data_dir, torch.device("cpu"))
    assert x.shape == (800, 3, 32, 32) and xt.shape == (400, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1 and set(y.tolist()) == set(range(10))   # label 10 became 0


def test_gradient_penalty_is_per_sample_over_all_dims():
    grad = torch.zeros(2, 3, 2, 2)
    grad[0, 0] = 1.0            # sample 0: 4 ones in channel 0 -> per-sample norm 2
    grad[1, :, 0, 0] = 0.6      # sample 1: 0.6 in each channel at one pixel -> norm sqrt(3)*0.6
    want = 10.0 * ((2.0 - 1) ** 2 + (0.6 * 3 ** 0.5 - 1) ** 2) / 2
    assert dgr.gradient_penalty(grad, 10.0).item() == pytest.approx(want, rel=1e-6)
    per_channel = 10.0 * ((grad.norm(dim=1) - 1) ** 2).mean()   # the bug of older DGR code
    assert abs(per_channel.item() - want) > 1.0


def test_gradient_penalty_matches_loop_on_random_input():
    g = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    want = sum((sum(v * v for v in g[b].flatten().tolist()) ** 0.5 - 1) ** 2 for b in range(5)) / 5 * 7.0
    assert dgr.gradient_penalty(g, 7.0).item() == pytest.approx(want, rel=1e-12)


def hand_ce(logits, targets):
    logp = logits - logits.exp().sum(1, keepdim=True).log()
    if targets.dtype.is_floating_point:
        return -(targets * logp).sum(1).mean()
    return -logp[torch.arange(len(targets)), targets].mean()


@pytest.mark.parametrize("soft", [False, True])
def test_replay_loss_weights_terms(soft):
    torch.manual_seed(0)
    lr, y = torch.randn(6, 10, dtype=torch.float64), torch.randint(10, (6,))
    lp = torch.randn(4, 10, dtype=torch.float64)
    t = torch.softmax(torch.randn(4, 10, dtype=torch.float64), 1) if soft else torch.randint(10, (4,))
    for r in (0.0, 0.3, 1.0):
        want = r * hand_ce(lr, y) + (1 - r) * hand_ce(lp, t)
        assert dgr.replay_loss(lr, y, lp, t, r).item() == pytest.approx(want.item(), rel=1e-12)
    assert dgr.replay_loss(lr, y, lp[:0], t[:0], 0.3).item() == pytest.approx(0.3 * hand_ce(lr, y).item())
    assert dgr.replay_loss(lr[:0], y[:0], lp, t, 0.3).item() == pytest.approx(0.7 * hand_ce(lp, t).item())


def test_permutations_are_bijections_fixed_by_seed():
    assert torch.equal(dgr.pixel_permutation(784, 3, 0), torch.arange(784))
    for t in (1, 2, 9):
        p = dgr.pixel_permutation(784, 3, t)
        assert torch.equal(p.sort().values, torch.arange(784))
        assert torch.equal(p, dgr.pixel_permutation(784, 3, t))
        assert not torch.equal(p, dgr.pixel_permutation(784, 4, t))
    assert not torch.equal(dgr.pixel_permutation(784, 3, 1), dgr.pixel_permutation(784, 3, 2))


def test_permuted_tasks_permute_pixels(mnist):
    b = dgr.Budget(n_tasks=3, train_limit=100, test_limit=50)
    tasks = dgr.permuted_tasks(mnist, b, seed=0)
    perm = dgr.pixel_permutation(784, 0, 2)
    assert torch.equal(tasks[2].x_train.flatten(1), tasks[0].x_train.flatten(1)[:, perm])
    assert torch.equal(tasks[2].x_test.flatten(1), tasks[0].x_test.flatten(1)[:, perm])   # tested as trained
    assert torch.equal(tasks[0].y_train, tasks[2].y_train)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 5, 7), (20,)])
def test_permuted_tasks_of_data_that_is_not_mnist(shape):
    """Any input shape: each task permutes all of an input's values, the same way for training and test."""
    x = torch.rand(30, *shape) * 2 - 1
    data = (x[:20], torch.arange(20) % 4, x[20:], torch.arange(10) % 4)
    tasks = dgr.permuted_tasks(data, dgr.Budget(n_tasks=3), seed=1)
    perm = dgr.pixel_permutation(x[0].numel(), 1, 2)
    assert tasks[2].x_train.shape == (20, *shape) and not torch.equal(perm, torch.arange(x[0].numel()))
    assert torch.equal(tasks[2].x_train.flatten(1), x[:20].flatten(1)[:, perm])
    assert torch.equal(tasks[2].x_test.flatten(1), x[20:].flatten(1)[:, perm])


def test_split_tasks_are_disjoint_and_cover_all_classes(mnist):
    tasks = dgr.split_tasks(mnist, dgr.Budget(), seed=0)
    seen = [set(t.y_train.tolist()) | set(t.y_test.tolist()) for t in tasks]
    assert seen == [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}]
    assert sum(len(t.y_train) for t in tasks) == 60000 and sum(len(t.y_test) for t in tasks) == 10000
    assert mnist[0].min() == -1.0 and mnist[0].max() == 1.0 and mnist[0].shape == (60000, 1, 28, 28)


def test_mnist_rgb32_is_padded_and_repeated():
    require_mnist()
    x, _, xt, _ = dgr.load_mnist(DATA, torch.device("cpu"), rgb32=True)
    assert x.shape == (60000, 3, 32, 32) and xt.shape == (10000, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 2]) and (x[:, :, :2] == -1).all()


@pytest.fixture
def old_scholar():
    torch.manual_seed(0)
    return dgr.Scholar((1, 28, 28), dgr.Budget(width=8, hidden=32)).frozen_copy()


def test_none_replays_nothing(old_scholar):
    assert dgr.Replay().inputs(16, (1, 28, 28)) is None


def test_er_replays_stored_real_inputs(old_scholar, mnist):
    pool = [mnist[0][:50], mnist[0][50:100]]
    x = dgr.Replay("stored", old_scholar, pool).inputs(64, (1, 28, 28))
    stored = torch.cat(pool).flatten(1)
    assert x.shape == (64, 1, 28, 28)
    assert all((stored == row).all(1).any() for row in x.flatten(1))
    from_first = sum(bool((pool[0].flatten(1) == row).all(1).any()) for row in x.flatten(1))
    assert 10 < from_first < 54   # both past tasks, about equally


def test_noise_replays_noise(old_scholar, mnist):
    x = dgr.Replay("noise", old_scholar).inputs(512, (1, 28, 28))
    assert x.shape == (512, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert abs(x.mean().item()) < 0.02 and 0.5 < x.std().item() < 0.8    # clamped N(0, 1)
    assert not (mnist[0][:1000].flatten(1) == x[0].flatten()).all(1).any()


def test_gr_replays_old_generator_samples_labelled_by_old_solver(old_scholar):
    torch.manual_seed(1)
    x = dgr.Replay("generator", old_scholar).inputs(8, (1, 28, 28))
    torch.manual_seed(1)
    assert torch.equal(x, old_scholar.sample(8))
    soft = old_scholar.label(x, soft=True)
    assert torch.allclose(soft.sum(1), torch.ones(8)) and torch.equal(soft.argmax(1), old_scholar.label(x))


def test_generator_batch_mixes_real_and_replayed(old_scholar, mnist):
    task = dgr.Task("t", mnist[0][:100], mnist[1][:100], mnist[2][:10], mnist[3][:10])
    x = dgr.generator_inputs(task, dgr.Replay("generator", old_scholar), r=0.25, n=32)
    real = task.x_train.flatten(1)
    is_real = torch.tensor([(real == row).all(1).any().item() for row in x.flatten(1)])
    assert is_real[:8].all() and not is_real[8:].any()


def test_solver_step_uses_old_solver_labels(old_scholar, mnist):
    """With r = 0 the solver learns only the old solver's answers on the replayed inputs: a new solver
    that starts out disagreeing with the old one comes to agree with it, not with the true labels."""
    torch.manual_seed(1)   # not the old scholar's seed: the two solvers start apart
    b = dgr.Budget(width=8, hidden=32)
    new = dgr.Scholar((1, 28, 28), b, with_generator=False)
    task = dgr.Task("t", mnist[0][:500], mnist[1][:500], mnist[2][:500], mnist[3][:500])
    replay = dgr.Replay("stored", old_scholar, [task.x_train])
    agree_old = lambda: float((new.label(task.x_test) == old_scholar.label(task.x_test)).float().mean())
    assert agree_old() < 0.5
    opt = torch.optim.Adam(new.solver.parameters(), lr=1e-3)
    for _ in range(150):
        dgr.solver_step(new, opt, task, replay, 0.0, 64)
    agree_true = float((new.label(task.x_test) == task.y_test).float().mean())
    # the old (untrained) solver's answers
    assert agree_old() > 0.75 and agree_true < 0.3, (agree_old(), agree_true)


def test_import_has_no_side_effects(tmp_path):
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import dgr; "
                           "from dgr import Scholar, train_task"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    assert os.listdir(tmp_path) == []


def test_distill_loss_is_temperature_scaled_soft_ce(old_scholar, mnist):
    """gr+distill: r*CE(z, y) + (1-r)*T^2*CE(z'/T, softmax(z_old'/T)), as in Hinton et al."""
    torch.manual_seed(0)
    new = dgr.Scholar((1, 28, 28), dgr.Budget(width=8, hidden=32), with_generator=False)
    task = dgr.Task("t", mnist[0][:64], mnist[1][:64], mnist[2][:8], mnist[3][:8])
    replay = dgr.Replay("stored", old_scholar, [mnist[0][64:128]], soft=True, temperature=3.0)
    torch.manual_seed(5)
    loss = dgr.solver_step(new, torch.optim.SGD(new.solver.parameters(), lr=0.0), task, replay, 0.25, 16)
    torch.manual_seed(5)
    x, y = dgr.random_batch(task, 16)
    x_rep = replay.inputs(16, (1, 28, 28))
    with torch.no_grad():
        target = (old_scholar.solver(x_rep) / 3.0).softmax(1)
        want = 0.25 * hand_ce(new.solver(x), y) + 0.75 * 9.0 * hand_ce(new.solver(x_rep) / 3.0, target)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_a_replay_batch_of_its_own_size(old_scholar, mnist):
    """replay_batch: 16 real inputs and 48 replayed ones in one step, each batch's CE its own mean."""
    torch.manual_seed(0)
    new = dgr.Scholar((1, 28, 28), dgr.Budget(width=8, hidden=32), with_generator=False)
    task = dgr.Task("t", mnist[0][:64], mnist[1][:64], mnist[2][:8], mnist[3][:8])
    replay = dgr.Replay("stored", old_scholar, [mnist[0][64:128]])
    torch.manual_seed(5)
    loss = dgr.solver_step(new, torch.optim.SGD(new.solver.parameters(), lr=0.0), task, replay, 0.25, 16, 48)
    torch.manual_seed(5)
    x, y = dgr.random_batch(task, 16)
    x_rep = replay.inputs(48, (1, 28, 28))
    with torch.no_grad():
        want = 0.25 * hand_ce(new.solver(x), y) + 0.75 * hand_ce(new.solver(x_rep), old_scholar.label(x_rep))
    assert len(x_rep) == 48 and loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_ewc_fisher_and_penalty(mnist):
    torch.manual_seed(0)
    b = dgr.Budget(hidden=32, fisher_samples=50, ewc_lambda=100.0)
    solver = dgr.Solver((1, 28, 28), hidden=32)
    task = dgr.Task("t", mnist[0][:200], mnist[1][:200], mnist[2][:10], mnist[3][:10])
    ewc = dgr.ewc_update(None, solver, task, b)
    assert all((f >= 0).all() for f in ewc["fisher"]) and sum(f.sum() for f in ewc["fisher"]) > 0
    assert dgr.ewc_penalty(solver, ewc).item() == 0.0                 # at the anchor
    with torch.no_grad():
        solver.heads[0].bias += 1.0
    want = 0.5 * 100.0 * ewc["fisher"][-1].sum().item()                # moved the last bias by 1
    assert dgr.ewc_penalty(solver, ewc).item() == pytest.approx(want, rel=1e-5)
    twice = dgr.ewc_update(ewc, solver, task, b)                       # online: Fisher accumulates
    assert all((f2 >= f1).all() for f1, f2 in zip(ewc["fisher"], twice["fisher"]))


def test_budget_overrides_reach_the_scholar():
    args = dgr.parse_args(["--exp", "split", "--preset", "paper",
                           "--budget", "gan=mlp,width=32,gen_lr=2e-4,critic_lr=4e-4,n_critic=3"])
    b = dgr.budget_for(args, "split")
    assert ((b.gan, b.width, b.gen_lr, b.critic_lr, b.n_critic, b.gen_iters)
            == ("mlp", 32, 2e-4, 4e-4, 3, 3000))
    s = dgr.Scholar((1, 28, 28), b)
    assert isinstance(s.generator, dgr.MLPGenerator)
    assert [m.out_features for m in s.critic if isinstance(m, torch.nn.Linear)] == [64, 32, 1]
    opts = s.optimizers(b)
    # TTUR
    assert opts["generator"].param_groups[0]["lr"] == 2e-4 and opts["critic"].param_groups[0]["lr"] == 4e-4
    assert s.sample(5).shape == (5, 1, 28, 28) and s.sample(5).abs().max() <= 1
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    before = [p.clone() for p in s.critic.parameters()]
    assert torch.isfinite(dgr.critic_step(s, opts["critic"], x, 10.0))
    moved = [not torch.equal(p, q) for p, q in zip(before, s.critic.parameters()) if p.dim() == 2]
    assert moved == [True, True, True]   # every weight matrix (the last bias gets no gradient in WGAN)
    for decay in ("1", "-0.5"):
        with pytest.raises(ValueError, match=r"gen_ema is in \[0, 1\)"):
            dgr.budget_overrides(f"gen_ema={decay}")


def test_the_method_stands_above_the_plumbing():
    """dgr.py is read top down: above the line that begins `# Plumbing` the method uses no name defined below
    it (what a reader copies out runs alone), lines stay within 110 characters, and no comment carries a
    date."""
    import ast
    import re
    from conftest import ROOT
    source = open(os.path.join(ROOT, "dgr.py")).read()
    lines = source.splitlines()
    banner = next(i for i, line in enumerate(lines, 1) if line.startswith("# Plumbing"))
    tree = ast.parse(source)
    below = {n.name for n in tree.body
             if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.lineno > banner}
    below |= {t.id for n in tree.body if isinstance(n, ast.Assign) and n.lineno > banner
              for t in n.targets if isinstance(t, ast.Name)}
    used = {(node.id, node.lineno) for top in tree.body if top.lineno < banner for node in ast.walk(top)
            if isinstance(node, ast.Name) and node.id in below}
    assert not used, sorted(used)
    assert [i for i, line in enumerate(lines, 1) if len(line) > 110] == []
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", source)
