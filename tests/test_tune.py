"""Stage 5, ``branchnas tune``: the search space, the budget constraint, resume, workers, PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from branchnas.errors import UserError
from branchnas.recipe import load_recipe
from branchnas.secrets import has_password, mask_url

sys.path.insert(0, str(Path(__file__).parent))
from test_finetune import tiny_overrides  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


# --------------------------------------------------------------------------- fast: no training


@pytest.mark.parametrize(("url", "masked"), [
    ("postgresql://ann:s3cret@db.lan:5432/optuna", "postgresql://ann:***@db.lan:5432/optuna"),
    ("postgresql+psycopg2://ann:p%40ss@10.0.0.1/db", "postgresql+psycopg2://ann:***@10.0.0.1/db"),
    ("mysql://root:x@h/db?charset=utf8", "mysql://root:***@h/db?charset=utf8"),
    ("postgresql://ann@db.lan/optuna", "postgresql://ann@db.lan/optuna"),
    ("sqlite:////tmp/a:b/study.db", "sqlite:////tmp/a:b/study.db"),
    ("see postgresql://u:pw@h/d and mysql://v:qq@h/e", "see postgresql://u:***@h/d and mysql://v:***@h/e"),
])
def test_mask_url_hides_exactly_the_password(url, masked):
    assert mask_url(url) == masked
    assert has_password(url) == (url != masked)


def test_the_saved_recipe_never_holds_the_storage_password(tmp_path):
    from branchnas.recipe import recipe_to_toml

    recipe = load_recipe(None, ["tune.storage=postgresql://ann:hunter2@db/optuna"])
    text = recipe_to_toml(recipe)
    assert "hunter2" not in text and 'storage = "postgresql://ann:***@db/optuna"' in text


def test_trial_recipe_sets_the_gated_variant_with_the_trials_settings():
    from branchnas.tuning import trial_recipe

    recipe = load_recipe(None, [])
    shared = trial_recipe(recipe, {"sparsity": 3.5, "target": 0.2})
    assert shared.finetune.variant == "gated"
    assert (shared.finetune.gated.sparsity, shared.finetune.gated.targets) == (3.5, 0.2)
    assert shared.finetune.lr == recipe.finetune.lr and shared.finetune.gated.lr == recipe.finetune.gated.lr
    per_task = trial_recipe(recipe, {"sparsity": 1.0, "target.shape": 0.1, "target.count": 0.4, "lr": 0.05})
    assert per_task.finetune.gated.targets == {"shape": 0.1, "count": 0.4} and per_task.finetune.lr == 0.05
    assert recipe.finetune.variant == "plain"  # the recipe itself is untouched


@pytest.mark.parametrize(("targets", "lr", "names"), [
    ("shared", False, {"sparsity", "target"}),
    ("per_task", True, {"sparsity", "target.a", "target.b", "lr"}),
    ("fixed", False, {"sparsity"}),
])
def test_the_search_space_has_readable_names_and_the_recipes_ranges(targets, lr, names):
    from branchnas.tuning import suggest

    recipe = load_recipe(None, [f"tune.targets={json.dumps(targets)}", f"tune.lr={str(lr).lower()}",
                                "tune.sparsity_min=0.5", "tune.sparsity_max=8", "tune.grid=[]", "tune.target_max=0.3"])
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        params = suggest(trial, recipe, ["a", "b"])
        study.tell(trial, 0.0)
        assert set(params) == names
        assert 0.5 <= params["sparsity"] <= 8
        assert all(0.0 <= v <= 0.3 for k, v in params.items() if k.startswith("target"))
        if lr:
            assert recipe.finetune.lr / 4 <= params["lr"] <= recipe.finetune.lr * 4
    dist = study.trials[0].distributions["sparsity"]
    assert dist.log and (dist.low, dist.high) == (0.5, 8)


def test_the_recipe_refuses_a_grid_outside_the_range_and_a_zero_lower_bound():
    from branchnas.errors import RecipeError

    with pytest.raises(RecipeError, match=r"tune.grid: 0.01, 0.03 outside \[tune.sparsity_min"):
        load_recipe(None, ["tune.sparsity_min=0.05"])
    with pytest.raises(RecipeError, match="tune.sparsity_min: expected > 0"):
        load_recipe(None, ["tune.sparsity_min=0", "tune.grid=[]"])


def _study_with(values_and_over):
    """An in-memory study whose trials have these (val Δ_MTL, params over budget) values."""
    study = optuna.create_study(direction="maximize")
    for value, over in values_and_over:
        trial = study.ask()
        trial.suggest_float("sparsity", 0.01, 30, log=True)
        if over is not None:
            trial.set_constraint("params_over_budget", over)
        study.tell(trial, value)
    return study


@pytest.mark.parametrize("cases", [
    [(5.0, 0.2), (3.0, -0.1), (4.0, 0.0), (1.0, -0.5)],
    [(9.0, 0.01), (8.0, 0.5)],
    [(2.0, -0.1), (2.5, -0.2), (7.0, 1.0)],
])
def test_best_trial_is_the_best_feasible_one_by_brute_force(cases):
    from branchnas.tuning import best_trial

    study = _study_with(cases)
    feasible = [(v, i) for i, (v, over) in enumerate(cases) if over <= 0]
    best = best_trial(study)
    if not feasible:
        assert best is None
    else:
        assert best.number == max(feasible)[1]


def test_a_pareto_study_picks_the_feasible_fronts_highest_delta():
    from branchnas.tuning import best_trial

    study = optuna.create_study(directions=["maximize", "minimize"])
    for value, size, over in [(5.0, 100, 0.3), (4.0, 90, -0.1), (3.0, 50, -0.5), (2.0, 95, -0.05)]:
        trial = study.ask()
        trial.suggest_float("sparsity", 0.01, 30, log=True)
        trial.set_constraint("params_over_budget", over)
        study.tell(trial, (value, size))
    assert best_trial(study).values == [4.0, 90]


def test_the_pareto_front_keeps_the_feasible_trials_nothing_beats_on_both_counts():
    from branchnas.tuning import pareto_front

    def row(n, delta, size, feasible):
        return {"number": n, "val_delta_mtl": delta, "params_count": size, "flops": None, "feasible": feasible}

    rows = [row(0, 5.0, 100, True), row(1, 4.0, 90, True), row(2, 3.0, 50, True), row(3, 2.0, 95, True),
            row(4, 9.0, 80, False), row(5, None, None, None), row(6, 3.0, 50, True)]
    # 3 is beaten by 1 (smaller and better), 4 is over the budget, 5 did not finish; 2 and 6 tie.
    assert [r["number"] for r in pareto_front(rows, "params")] == [2, 6, 1, 0]


def test_the_pruner_waits_half_the_epochs_and_never_prunes_the_last_one(tmp_path, monkeypatch):
    """A stub trial reports per-epoch val metrics through the trainer's callback: with every
    earlier trial ahead of it, it is pruned at the first epoch after half of them, never at the
    last one, and never before."""
    from branchnas import tuning
    from branchnas.tasks import Task

    task = Task(name="a", kind="classification", target="a", num_classes=2)
    baseline = {"a": {"accuracy": 0.5}}

    def runner_for(epochs, values):
        recipe = load_recipe(None, [f"finetune.epochs={epochs}", "tune.pruner_startup=2", "tune.grid=[]"])
        study = tuning.open_study(recipe, f"sqlite:///{tmp_path / f'{epochs}.db'}", "s")
        runner = object.__new__(tuning.TrialRunner)
        runner.recipe, runner.study, runner.names = recipe, study, ["a"]
        runner.splits, runner.baseline_val = ({}, [task]), baseline
        runner.metric, runner.limit, runner.root = "params", 1000, tmp_path / "trials"

        def train(params, folder, desc, callbacks=()):
            for epoch, value in enumerate(values, 1):
                for callback in callbacks:
                    callback({"epoch": epoch, "val": {"a": {"accuracy": value}}})
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model.pt").write_bytes(b"x")
            return {"params": 900, "flops": 1, "delta_mtl": 0.0, "delta_mtl_val": values[-1] / 0.5 - 1,
                    "tasks": [{"name": "a", "metric": "accuracy"}], "val": {"a": {"accuracy": values[-1]}},
                    "test": {"a": {"accuracy": values[-1]}}}

        runner.train = train
        return runner, study

    for epochs in (1, 2, 3, 4, 6):
        runner, study = runner_for(epochs, [0.9] * epochs)
        for _ in range(2):  # two good trials first
            study.optimize(runner.objective, n_trials=1)
        low, _ = runner_for(epochs, [0.1] * epochs)
        runner.train = low.train
        study.optimize(runner.objective, n_trials=1)
        last = study.trials[-1]
        first = tuning.warmup_epochs(epochs)
        if first < epochs:
            assert last.state == optuna.trial.TrialState.PRUNED, epochs
            assert max(last.intermediate_values) == first, epochs  # pruned at the first allowed epoch
        else:  # nothing may be pruned: the first allowed epoch is the last
            assert last.state == optuna.trial.TrialState.COMPLETE, epochs
    assert [tuning.warmup_epochs(e) for e in (1, 2, 3, 4, 6)] == [1, 2, 2, 3, 4]


def test_trials_count_toward_the_target_and_a_killed_calls_request_resumes():
    from branchnas.stages.tune import REQUEST_ATTR, _target

    recipe = load_recipe(None, ["tune.trials=5"])
    study = _study_with([(1.0, -1.0), (2.0, -1.0)])
    assert _target(study, recipe, None) == 5  # fill up to tune.trials
    assert _target(study, recipe, 3) == 5  # two held + three more
    assert study.user_attrs[REQUEST_ATTR] == 5
    assert _target(study, recipe, 3) == 5  # the same call again (it was killed): resume it, do not add
    study.set_user_attr(REQUEST_ATTR, None)  # that call finished
    assert _target(study, recipe, 1) == 3


def test_a_dead_local_workers_running_trial_is_failed_and_enqueued_again(tmp_path):
    from branchnas.tuning import _storage, fail_dead_local_trials

    study = optuna.create_study(storage=_storage(f"sqlite:///{tmp_path / 's.db'}"), direction="maximize")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask()
    trial.suggest_float("sparsity", 0.01, 30, log=True)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    alive = study.ask()
    alive.suggest_float("sparsity", 0.01, 30, log=True)
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    assert fail_dead_local_trials(study) == [trial.number]
    states = {t.number: t.state for t in study.trials}
    assert states[trial.number] == optuna.trial.TrialState.FAIL
    assert states[alive.number] == optuna.trial.TrialState.RUNNING
    retry = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(retry) == 1 and retry[0].params == study.trials[trial.number].params


def test_check_refuses_a_latency_budget_and_a_bad_storage_before_any_work(in_tmp):
    from branchnas.pipeline import check, plan

    latency = load_recipe(None, ["search.metric=latency", "search.budget=8ms"])
    with pytest.raises(UserError, match="latency budget.*cannot constrain the trials"):
        check(latency, ["tune"])
    with pytest.raises(UserError, match="tune.storage: expected an Optuna RDB URL"):
        check(load_recipe(None, ["tune.storage=redis://h/0"]), ["tune"])
    port = _free_port()  # nothing listens there
    recipe = load_recipe(None, [f"tune.storage=postgresql://ann:topsecret@127.0.0.1:{port}/optuna"])
    with pytest.raises(UserError) as err:
        check(recipe, plan(["tune"], recipe))
    assert "does not answer" in str(err.value) and "topsecret" not in str(err.value)
    assert "postgresql://ann:***@127.0.0.1" in str(err.value)
    assert not Path("runs").exists()  # nothing was written


def test_run_includes_tune_only_when_the_recipe_enables_it():
    from branchnas.pipeline import default_stages, plan

    assert "tune" not in default_stages(load_recipe(None, []))
    enabled = load_recipe(None, ["tune.enabled=true"])
    assert default_stages(enabled)[-2:] == ["tune", "export"]
    assert plan(["export"], enabled).index("tune") < plan(["export"], enabled).index("export")


# --------------------------------------------------------------------------- tiny end-to-end runs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sets(out, *extra):
    sets = tiny_overrides(out, "tiny", "finetune.epochs=3", "tune.pruner=none", *extra)
    return sum((["--set", s] for s in sets), [])


def _cli(*args, env=None, check=True, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "branchnas", *args], env=env, check=check, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny run up to stage 4 (copied by each test that tunes)."""
    from branchnas.pipeline import open_run, run_stages

    out = tmp_path_factory.mktemp("tune")
    recipe = load_recipe(None, tiny_overrides(out, "tiny", "finetune.epochs=3", "tune.pruner=none"))
    run_stages(recipe, ["finetune"], rundir=open_run(recipe), progress=False)
    return out


def _copy(finetuned, tmp_path):
    shutil.copytree(finetuned, tmp_path / "runs")
    return tmp_path / "runs"


def _study(out):
    storage = f"sqlite:///{out / 'tiny' / 'tune-study' / 'study.db'}"
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    return optuna.load_study(study_name=name, storage=storage)


def _finished_and_training(trials: Path) -> bool:
    """One trial folder holds a finished trial (its report, checkpoints gone) and another a training one."""
    done = {p.parent for p in trials.glob("*/report.json")}
    training = {p.parent.parent for p in trials.glob("*/ckpt/model.pt")}
    return bool(done - training) and bool(training - done)


@pytest.mark.slow
def test_tune_resumes_after_sigkill_adds_trials_and_export_writes_its_best(finetuned, tmp_path):
    out = _copy(finetuned, tmp_path)
    args = ["tune", "--trials", "3", *_sets(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "branchnas", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    trials = out / "tiny" / "tune-study" / "trials"
    deadline = time.monotonic() + 300
    try:  # kill it once one trial is finished (its report kept) and the next one is training (a checkpoint)
        # The folders tell, not the study: opening the SQLite file while the tune creates it would race it.
        while not _finished_and_training(trials):
            assert proc.poll() is None, "the tune ended before it could be killed; make the trials longer"
            assert time.monotonic() < deadline, "no trial finished"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    study = _study(out)
    killed = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(killed) == 1
    first = study.trials[0]
    first_report = Path(first.user_attrs["model"]).parent / "report.json"
    stamp = first_report.stat().st_mtime_ns
    assert not (out / "tiny" / "tune" / "model.pt").exists()  # nothing was swapped in

    _cli(*args)  # the same command resumes: the killed trial is tried again, the finished one is kept
    study = _study(out)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 3
    assert study.trials[killed[0].number].state == optuna.trial.TrialState.FAIL
    retried = [t for t in finished if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retried) == 1 and retried[0].params == killed[0].params
    assert first_report.stat().st_mtime_ns == stamp  # not trained again

    # Every finished trial carries its constraint and sizes, readable with Optuna's own API.
    for trial in finished:
        assert set(trial.constraints) == {"params_over_budget"}
        assert trial.constraints["params_over_budget"] == pytest.approx(trial.user_attrs["params"] / 40_000 - 1)
        assert {"params", "flops", "val_delta_mtl", "test_delta_mtl", "val", "worker"} <= set(trial.user_attrs)
    report = json.loads((out / "tiny" / "tune" / "report.json").read_text())
    best = study.best_trial
    assert report["tune"]["best"]["number"] == best.number and best.constraints["params_over_budget"] <= 0
    assert report["params"] == best.user_attrs["params"] <= 40_000
    assert report["delta_mtl_val"] * 100 == pytest.approx(best.value)

    _cli("tune", "--trials", "2", *_sets(out))  # a second call adds two
    assert len([t for t in _study(out).trials if t.state == optuna.trial.TrialState.COMPLETE]) == 5

    result = _cli("export", *_sets(out))
    assert "the exported network is the tuned one" in result.stdout
    exported = torch.jit.load(str(out / "tiny" / "export" / "model.pt"))
    from branchnas.finetune import load_model_file

    tuned = load_model_file(out / "tiny" / "tune" / "model.pt")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for task, value in exported(x).items():
            torch.testing.assert_close(value, tuned(x)[task], rtol=1e-5, atol=1e-5)
    shown = _cli("tune", "--show", "--png", str(tmp_path / "show.png"), *_sets(out))
    assert f"*{_study(out).best_trial.number} " in shown.stdout
    assert (tmp_path / "show.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "tiny" / "tune" / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Tuning (stage 5)" in (out / "tiny" / "report.md").read_text()
    # compare lists the tuned network as a row of its own, as trained by the study (no new training).
    _cli("compare", "--variants", "plain", *_sets(out))
    rows = json.loads((out / "tiny" / "compare" / "compare.json").read_text())["rows"]
    (row,) = [r for r in rows if r["kind"] == "tuned"]
    report = json.loads((out / "tiny" / "tune" / "report.json").read_text())
    assert row["name"] == f"tuned (gated, trial {report['tuned']['trial']})"
    assert row["params"] == report["params"] and row["test"] == report["test"]


@pytest.mark.slow
def test_run_with_tune_enabled_exports_the_tuned_network(finetuned, tmp_path):
    out = _copy(finetuned, tmp_path)
    result = _cli("run", "--json", *_sets(out, "tune.enabled=true", "tune.trials=2"))
    data = json.loads(result.stdout)
    assert list(data["stages"]) == ["pretrain", "affinity", "search", "finetune", "tune", "export"]
    assert data["stages"]["tune"]["skipped"] is False and data["summary"]["tuned"]["trials"] == 2
    manifest = json.loads((out / "tiny" / "manifest.json").read_text())
    assert manifest["stages"]["export"]["source"] == "tune"
    assert "tune" in manifest["stages"]["export"]["depends"]


@pytest.mark.slow
def test_the_best_trial_is_trained_again_identically_when_its_folder_is_gone(finetuned, tmp_path):
    out = _copy(finetuned, tmp_path)
    _cli("tune", "--trials", "2", *_sets(out))
    before = torch.load(out / "tiny" / "tune" / "model.pt", weights_only=True)
    best = _study(out).best_trial
    shutil.rmtree(Path(best.user_attrs["model"]).parent)  # as if another machine had run it
    _cli("tune", "--force", *_sets(out, "tune.trials=2"))
    report = json.loads((out / "tiny" / "tune" / "report.json").read_text())
    assert report["tuned"]["model_from"] == "trained again" and report["tuned"]["trial"] == best.number
    after = torch.load(out / "tiny" / "tune" / "model.pt", weights_only=True)
    assert before["gates"] == after["gates"]
    for key, value in before["state_dict"].items():
        assert torch.equal(value, after["state_dict"][key]), key


# --------------------------------------------------------------------------- PostgreSQL, two workers


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    return None


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server on loopback for this module; yields its URL (user branchnas, database optuna)."""
    import tempfile

    folder = _postgres_bin()
    required = os.environ.get("BRANCHNAS_REQUIRE_POSTGRES")
    if folder is None:
        if required:
            pytest.fail("BRANCHNAS_REQUIRE_POSTGRES is set but no PostgreSQL server (initdb, pg_ctl) is installed")
        pytest.skip("no PostgreSQL server installed (initdb, pg_ctl); apt-get install postgresql")
    try:
        import psycopg
    except ImportError:
        if required:
            pytest.fail("BRANCHNAS_REQUIRE_POSTGRES is set but psycopg is not installed: pip install 'branchnas[postgres]'")
        pytest.skip("psycopg is not installed: pip install 'branchnas[postgres]'")
    root = Path(tempfile.mkdtemp(prefix="branchnas-pg-"))
    root.chmod(0o755)
    prefix = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        user = next((u for u in ("postgres", "nobody") if _has_user(pwd, u)), None)
        if user is None:
            pytest.skip("running as root with neither a 'postgres' nor a 'nobody' user to run PostgreSQL as")
        uid = pwd.getpwnam(user).pw_uid
        os.chown(root, uid, -1)
        prefix = ["runuser", "-u", user, "--"]
    port = _free_port()
    data, log = root / "data", root / "server.log"
    subprocess.run([*prefix, str(folder / "initdb"), "-D", str(data), "-A", "trust", "-U", "branchnas", "-N"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*prefix, str(folder / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o", options, "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="branchnas", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE optuna")
        yield f"postgresql://branchnas@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*prefix, str(folder / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(pwd, name):
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study_and_one_final_model_is_written(finetuned, tmp_path, postgres):
    out = _copy(finetuned, tmp_path)
    # The password is accepted and ignored by the server (trust); it must never be shown or saved.
    url = postgres.replace("branchnas@", "branchnas:pw-never-shown@")
    sets = _sets(out, "tune.trials=6")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "branchnas", "tune", *flags, "--storage", url, *sets], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, flags in (("stage", []), ("worker", ["--worker"]))
    }
    outputs = {name: proc.communicate(timeout=900) for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, outputs[name][1][-2000:])
    (summary,) = optuna.get_all_study_summaries(postgres)
    study = optuna.load_study(study_name=summary.study_name, storage=postgres)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 6 <= len(finished) <= 7  # a worker may start one more as the sixth finishes
    pids = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in finished}
    assert pids == {str(procs["stage"].pid), str(procs["worker"].pid)}  # both took trials
    # Exactly one final model: the stage's, the best feasible trial of the whole study.
    report = json.loads((out / "tiny" / "tune" / "report.json").read_text())
    assert report["tune"]["best"]["number"] == study.best_trial.number
    assert (out / "tiny" / "tune" / "model.pt").is_file()
    manifest = json.loads((out / "tiny" / "manifest.json").read_text())
    assert manifest["stages"]["tune"]["status"] == "done"
    assert not (out / "tiny" / ".staging" / "tune").exists()
    assert "worker:" in outputs["worker"][0]
    # The password reached neither the terminal nor any file in the run directory.
    for text in (*outputs["stage"], *outputs["worker"]):
        assert "pw-never-shown" not in text
    for path in (out / "tiny").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".toml", ".md", ".csv", ".log", ""):
            assert b"pw-never-shown" not in path.read_bytes(), path
