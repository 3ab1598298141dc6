"""Stage 5's work: an Optuna study over the gated variant's λ_s and τ, the budget a hard constraint.

Each trial fine-tunes the chosen tree with the gated variant (:mod:`branchnas.variants.gated`)
under the sampled settings, exactly as stage 4 would with them in the recipe, and scores the
pruned network:

* **search space**: ``sparsity`` (λ_s, log-uniform in ``[tune.sparsity_min, .sparsity_max]``),
  ``target`` (one hinge target τ for every task) or ``target.<task>`` (one per task), and with
  ``tune.lr`` the fine-tuning ``lr``. GatedMTL's λ_s grid (``tune.grid``) is enqueued first.
* **objective**: val Δ_MTL in percent, maximised (``tune.objective = "pareto"``: also the
  pruned size, minimised). Test metrics are recorded, never optimised.
* **constraint**: the pruned network's params (or FLOPs) against the search budget, through
  Optuna's own :meth:`optuna.trial.Trial.set_constraint` (``<metric>_over_budget`` =
  size / budget − 1; feasible when ≤ 0). Constraint-aware samplers (TPE) use it, and
  :attr:`optuna.study.Study.best_trial` returns the best *feasible* trial.
* **pruning**: each epoch's val Δ_MTL is reported through the trainer's epoch callback and
  Optuna's pruner (median by default) stops a trial that falls behind.

The study lives in an Optuna storage: by default SQLite in ``<run dir>/tune-study/study.db``,
or any RDB URL (``tune.storage``, PostgreSQL for many workers). It is the study's own state,
outside the stage's outputs: a killed tune keeps every finished trial, retries the one it was
running (from its last epoch checkpoint), and ``branchnas tune --trials N`` adds to it. Each
trial trains in ``tune-study/trials/<key>/`` (key: study and parameters), keeping its
pruned ``model.pt`` and ``report.json``.

Only the stage (:mod:`branchnas.stages.tune`, the run directory's lock holder) writes the
final model: the best feasible trial's network, copied from its trial folder, or trained
again from its parameters (the same seeds give the same network) when another machine ran it.
Workers (``branchnas tune --worker``) only add trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from branchnas.errors import UserError
from branchnas.rundir import fingerprint
from branchnas.secrets import mask_url

if TYPE_CHECKING:
    import optuna

    from branchnas.recipe import Recipe
    from branchnas.rundir import RunDir

__all__ = [
    "STUDY_DIR",
    "storage_url",
    "check_storage",
    "study_name",
    "open_study",
    "suggest",
    "trial_recipe",
    "run_trials",
    "best_trial",
    "trial_rows",
    "trials_table",
    "plot_study",
    "pareto_front",
    "finished_count",
]

#: The study's folder in the run directory (SQLite file and trial folders), outside the stages'.
STUDY_DIR = "tune-study"
#: Seconds between a running trial's heartbeats, and after which a silent one counts as dead.
HEARTBEAT, GRACE = 20, 90
#: Study user attribute: how many finished trials the study should hold (workers stop there).
TARGET_ATTR = "target_trials"
#: How many times a trial killed with its worker is tried again.
RETRIES = 2


# --------------------------------------------------------------------------- storage


def storage_url(recipe: Recipe, rundir: RunDir) -> str:
    """``tune.storage``, or SQLite in ``<run dir>/tune-study/study.db``."""
    if recipe.tune.storage:
        return recipe.tune.storage
    return f"sqlite:///{(Path(rundir.path) / STUDY_DIR / 'study.db').resolve()}"


def check_storage(url: str, *, connect: bool) -> None:
    """The URL names a storage Optuna can use, its driver is installed and (``connect``) it answers.

    Raises:
        UserError: one line with the (masked) URL and the fix.
    """
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower() if "://" in url else ""
    if scheme not in ("sqlite", "postgresql", "postgres", "mysql"):
        raise UserError(f"tune.storage: expected an Optuna RDB URL (sqlite:///FILE, postgresql://USER@HOST/DB, "
                        f"mysql://...); got {mask_url(url)!r}")
    import sqlalchemy

    try:  # the database driver SQLAlchemy picks for this URL (psycopg for postgresql://)
        sqlalchemy.engine.make_url(_driver_url(url)).get_dialect().import_dbapi()
    except ImportError as err:
        fix = "pip install 'branchnas[postgres]'" if scheme.startswith("postgres") else f"pip install {err.name}"
        raise UserError(f"tune.storage {mask_url(url)!r} needs the database driver {err.name!r}, which is not "
                        f"installed; {fix}") from None
    except Exception as err:  # noqa: BLE001  (an unknown dialect or a malformed URL)
        raise UserError(f"tune.storage {mask_url(url)!r}: {mask_url(str(err))}") from None
    if connect and scheme != "sqlite":
        try:
            engine = sqlalchemy.create_engine(_driver_url(url), connect_args=_connect_args(url))
            with engine.connect():
                pass
            engine.dispose()
        except Exception as err:  # noqa: BLE001  (any driver error is the user's to fix)
            first = mask_url(str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__
            raise UserError(f"tune.storage {mask_url(url)!r} does not answer ({first}); start the database, or check "
                            "the URL and PGPASSWORD") from None


def _driver_url(url: str) -> str:
    # "postgres://" is common shorthand that SQLAlchemy does not accept.
    return "postgresql://" + url[len("postgres://"):] if url.startswith("postgres://") else url


def _connect_args(url: str) -> dict[str, Any]:
    return {"connect_timeout": 10} if url.startswith(("postgresql", "postgres")) else {"timeout": 60}


def _storage(url: str) -> optuna.storages.RDBStorage:
    import optuna

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 5; it is what resumes trials
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    _driver_url(url), engine_kwargs={"connect_args": _connect_args(url)},
                    heartbeat_interval=HEARTBEAT, grace_period=GRACE,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES),
                )
        except Exception as err:  # noqa: BLE001
            # Two processes opening a new database at once race to create Optuna's tables (workers
            # starting together): the loser finds them half made; a moment later they are there.
            if attempt < 3:
                time.sleep(1.0 + attempt)
                continue
            first = mask_url(str(err).strip().splitlines()[0]) if str(err).strip() else type(err).__name__
            raise UserError(f"cannot open the Optuna storage {mask_url(url)!r} ({first})") from None
    raise AssertionError("unreachable")


def warmup_epochs(epochs: int) -> int:
    """The first epoch at which the median pruner may stop a trial: the first after half the epochs.

    Optuna's ``n_warmup_steps`` (steps before it are never pruned); the last epoch is never
    pruned either (:meth:`TrialRunner.objective`).
    """
    return epochs // 2 + 1


def study_name(recipe: Recipe, key: Any) -> str:
    """``tune.study``, or ``<name>-<hash of key>`` (key: the tree, fine-tuning settings and search space)."""
    return recipe.tune.study or f"{recipe.name}-{fingerprint(key)[:10]}"


def open_study(recipe: Recipe, url: str, name: str, *, create: bool = True, seed_tag: str = "main") -> optuna.Study:
    """The study ``name`` in ``url``, with its sampler and pruner (created unless ``create`` is false)."""
    import optuna

    from branchnas.training.runtime import derive_seed

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = recipe.tune
    storage = _storage(url)
    try:  # each call's sampler starts from its own seed, or a resumed study would repeat its first samples
        held = len(storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False))
    except KeyError:
        held = 0
    seed = derive_seed(recipe.seed, "tune", seed_tag, held) % (2**32)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if cfg.objective == "delta" and cfg.pruner == "median":
        # Measured on the default recipe: after epoch 1 every trial sits at -13..-16% val Δ_MTL,
        # whatever its λ_s, so pruning starts in the second half of the epochs.
        pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup,
                                             n_warmup_steps=warmup_epochs(recipe.finetune.epochs))
    elif cfg.objective == "delta" and cfg.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=recipe.finetune.epochs)
    directions = ["maximize"] if cfg.objective == "delta" else ["maximize", "minimize"]
    if not create:
        try:
            return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        except KeyError:
            raise UserError(f"no study named {name!r} in {mask_url(url)}; run `branchnas tune` first") from None
    try:
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                   directions=directions, load_if_exists=True)
    except ValueError as err:  # an existing study with other directions
        raise UserError(f"study {name!r} in {mask_url(url)}: {err}; choose another --study or tune.objective") from None


# --------------------------------------------------------------------------- the search space


def suggest(trial: optuna.Trial, recipe: Recipe, task_names: Sequence[str]) -> dict[str, float]:
    """Sample one trial's settings (Optuna parameter names: ``sparsity``, ``target``/``target.<task>``, ``lr``)."""
    cfg = recipe.tune
    params = {"sparsity": trial.suggest_float("sparsity", cfg.sparsity_min, cfg.sparsity_max, log=True)}
    if cfg.targets == "shared":
        params["target"] = trial.suggest_float("target", cfg.target_min, cfg.target_max)
    elif cfg.targets == "per_task":
        for name in task_names:
            params[f"target.{name}"] = trial.suggest_float(f"target.{name}", cfg.target_min, cfg.target_max)
    if cfg.lr:
        lr = recipe.finetune.lr
        params["lr"] = trial.suggest_float("lr", lr / 4, lr * 4, log=True)
    return params


def trial_recipe(recipe: Recipe, params: Mapping[str, float]) -> Recipe:
    """``recipe`` with one trial's settings: the gated variant with its λ_s, τ and lr."""
    gated = dataclasses.replace(recipe.finetune.gated, sparsity=float(params["sparsity"]))
    if "target" in params:
        gated = dataclasses.replace(gated, targets=float(params["target"]))
    per_task = {k.split(".", 1)[1]: float(v) for k, v in params.items() if k.startswith("target.")}
    if per_task:
        gated = dataclasses.replace(gated, targets=per_task)
    finetune = dataclasses.replace(recipe.finetune, variant="gated", gated=gated)
    if "lr" in params:
        finetune = dataclasses.replace(finetune, lr=float(params["lr"]))
    return dataclasses.replace(recipe, finetune=finetune)


def enqueue_grid(study: optuna.Study, recipe: Recipe) -> None:
    """Enqueue the next untried λ_s of GatedMTL's grid (``tune.grid``) when no trial waits.

    One at a time, so that a trial enqueued again after its worker died runs before the rest
    of the grid (Optuna runs waiting trials oldest first).
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return
    tried = {t.params.get("sparsity") for t in trials}
    for value in recipe.tune.grid:
        if float(value) not in tried:
            study.enqueue_trial({"sparsity": float(value)}, skip_if_exists=True)
            return


# --------------------------------------------------------------------------- running trials


def finished_count(study: optuna.Study) -> int:
    """Trials that count towards the target: complete or pruned (failed ones are retried)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def worker_id() -> str:
    """``host:pid`` of this process (a trial's ``worker`` attribute)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """Fail (and enqueue again) the running trials of processes of this host that no longer exist.

    A killed tune leaves its trial ``RUNNING``; on this host that is known at once (its pid is
    gone), elsewhere Optuna's heartbeat finds it after :data:`GRACE` seconds.
    """
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(trial.user_attrs.get("worker", ""))
        name, _, pid = owner.rpartition(":")
        if name != host or not pid.isdigit() or _alive(int(pid)):
            continue
        if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):  # noqa: SLF001
            with warnings.catch_warnings():  # "experimental" in Optuna 5, and what its heartbeat uses itself
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)(
                    study, study._storage.get_trial(trial._trial_id))  # noqa: SLF001
            failed.append(trial.number)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _trial_folder(root: Path, key: str) -> Iterator[Path]:
    """``root/key``, held with a lock so that two processes never train into one folder."""
    root.mkdir(parents=True, exist_ok=True)
    for name in (key, f"{key}-{os.getpid()}"):
        fh = open(root / f".{name}.lock", "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        try:
            yield root / name
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()
        return
    raise RuntimeError(f"trial folder {root / key} is in use")


class TrialRunner:
    """Everything a trial needs, loaded once per process: the tree, the data, the baselines, the budget.

    Args:
        recipe: The resolved recipe.
        rundir: The run directory (read: ``pretrain/``, ``search/``, ``affinity/``).
        tree: The tree every trial fine-tunes (the search's choice).
        study: The study (its name keys the trial folders).
        progress: Show each trial's progress bar.
    """

    def __init__(self, recipe: Recipe, rundir: RunDir, tree: Any, study: optuna.Study, *, progress: bool = True):
        from branchnas.data import load_splits
        from branchnas.finetune import single_task_metrics
        from branchnas.stages.search import read_result

        self.recipe, self.rundir, self.tree, self.study = recipe, rundir, tree, study
        self.splits = load_splits(recipe)
        self.names = [t.name for t in self.splits[1]]
        self.baseline_val = single_task_metrics(rundir, "val")
        result, _ = read_result(rundir)
        self.metric, self.limit = result.metric, result.budget
        self.root = Path(rundir.path) / STUDY_DIR / "trials"
        self.progress = progress

    def key(self, params: Mapping[str, float]) -> str:
        """The trial folder's name: the study and the parameters (a retried trial finds its checkpoints)."""
        return fingerprint(self.study.study_name, {k: float(v) for k, v in sorted(params.items())})

    def train(self, params: Mapping[str, float], folder: Path, desc: str,
              callbacks: Sequence[Callable[[dict[str, Any]], None]] = ()) -> dict[str, Any]:
        """Fine-tune the gated network of ``params`` into ``folder`` (resumes; returns its report)."""
        from branchnas.finetune import finetune_tree

        return finetune_tree(trial_recipe(self.recipe, params), self.rundir, self.tree, folder, desc=desc,
                             splits=self.splits, variant="gated", callbacks=callbacks)

    def objective(self, trial: optuna.Trial) -> float | tuple[float, float]:
        import optuna

        from branchnas.rundir import file_sha256
        from branchnas.tasks import delta_mtl

        params = suggest(trial, self.recipe, self.names)
        trial.set_user_attr("worker", worker_id())
        tasks = self.splits[1]
        single = self.recipe.tune.objective == "delta"
        epochs = self.recipe.finetune.epochs

        def report_epoch(info: Mapping[str, Any]) -> None:
            if not single:  # Optuna prunes single-objective studies only
                return
            value = 100.0 * delta_mtl(info["val"], self.baseline_val, tasks, undefined="nan")
            if math.isfinite(value):
                trial.report(value, info["epoch"])
            # The last epoch is never pruned: its training is done, and its result counts.
            if info["epoch"] < epochs and trial.should_prune():
                raise optuna.TrialPruned(f"val Δ_MTL {value:+.2f}% at epoch {info['epoch']}")

        started = time.time()
        with _trial_folder(self.root, self.key(params)) as folder:
            try:
                report = self.train(params, folder, f"trial {trial.number}", [report_epoch])
            except optuna.TrialPruned:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            shutil.rmtree(folder / "ckpt", ignore_errors=True)  # the trial is done: its checkpoints are not needed
            model = folder / "model.pt"
            size = int(report[self.metric]) if self.metric in report else None
            attrs = {
                "params": report["params"], "flops": report["flops"],
                "budget_metric": self.metric, "budget_limit": self.limit,
                "val_delta_mtl": 100.0 * report["delta_mtl_val"], "test_delta_mtl": 100.0 * report["delta_mtl"],
                "val": {t: report["val"][t][m] for t, m in _primary(report).items()},
                "test": {t: report["test"][t][m] for t, m in _primary(report).items()},
                "openness": {t: round(v, 4) for t, v in _mean_openness(report).items()},
                "seconds": round(time.time() - started, 1),
                "model": str(model.resolve()), "model_sha256": file_sha256(model),
            }
        for name, value in attrs.items():
            trial.set_user_attr(name, value)
        if self.limit is not None and size is not None:
            trial.set_constraint(f"{self.metric}_over_budget", size / self.limit - 1.0)
        value = 100.0 * report["delta_mtl_val"]
        return value if single else (value, float(size if size is not None else report["params"]))


def _primary(report: Mapping[str, Any]) -> dict[str, str]:
    return {t["name"]: t["metric"] for t in report["tasks"]}


def _mean_openness(report: Mapping[str, Any]) -> dict[str, float]:
    """Each task's mean share of task-specific channels over the shared nodes (``{node: {task: share}}``)."""
    openness = (report.get("gates") or {}).get("openness") or {}
    out = {}
    for task in report["tasks"]:
        values = [float(shares[task["name"]]) for shares in openness.values() if task["name"] in shares]
        if values:
            out[task["name"]] = sum(values) / len(values)
    return out


def run_trials(runner: TrialRunner, target: int, *, timeout: float | None = None) -> int:
    """Take trials until the study holds ``target`` finished ones (counting every worker's), or ``timeout``.

    Returns:
        How many trials this process finished (its worker id on complete or pruned trials).
    """
    from optuna.trial import TrialState

    study = runner.study
    fail_dead_local_trials(study)
    started = time.time()
    # The target is read again before each trial: the stage's process sets it for every worker.
    while finished_count(study) < int(study.user_attrs.get(TARGET_ATTR, target)):
        left = None if not timeout else timeout - (time.time() - started)
        if left is not None and left <= 0:
            break
        enqueue_grid(study, runner.recipe)
        study.optimize(runner.objective, n_trials=1, timeout=left, catch=(),
                       gc_after_trial=True, show_progress_bar=False)
    me = worker_id()
    return sum(t.user_attrs.get("worker") == me
               for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def wait_for_running(study: optuna.Study, *, poll: float = 5.0, limit: float | None = None) -> None:
    """Wait until no trial of the study runs (other workers' included); dead ones fail by heartbeat."""
    import optuna
    from optuna.trial import TrialState

    started = time.time()
    while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        fail_dead_local_trials(study)
        optuna.storages.fail_stale_trials(study)
        if limit is not None and time.time() - started > limit:
            return
        time.sleep(poll)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best feasible complete trial (Pareto: the feasible front's highest val Δ_MTL), or ``None``."""
    if len(study.directions) == 1:
        try:
            return study.best_trial  # Optuna's own choice: the best among trials that meet the constraints
        except ValueError:
            return None
    front = study.best_trials  # feasible Pareto front when constraints are set
    return max(front, key=lambda t: t.values[0]) if front else None


# --------------------------------------------------------------------------- reading the study


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One plain row per trial: number, state, parameters, val Δ_MTL, size, feasibility, time, worker."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        over = trial.constraints
        rows.append({
            "number": trial.number,
            "state": trial.state.name.lower(),
            "params": dict(trial.params),
            "val_delta_mtl": trial.values[0] if trial.values else None,
            "test_delta_mtl": attrs.get("test_delta_mtl"),
            "last_epoch": max(trial.intermediate_values) if trial.intermediate_values else None,
            "params_count": attrs.get("params"),
            "flops": attrs.get("flops"),
            "feasible": (all(v <= 0 for v in over.values()) if over else None),
            "seconds": attrs.get("seconds") or (trial.duration.total_seconds() if trial.duration else None),
            "worker": attrs.get("worker"),
        })
    return rows


def _size_key(metric: str) -> str:
    """The row key of a trial's pruned size in ``metric`` (see :func:`trial_rows`)."""
    return "flops" if metric == "flops" else "params_count"


def trials_table(rows: Sequence[Mapping[str, Any]], metric: str, limit: int | None, *,
                 best: int | None = None, top: int | None = None) -> str:
    """The trials as an aligned table, best val Δ_MTL first (``top``: only so many)."""
    from tabulate import tabulate

    from branchnas.budget import format_count

    size_key = _size_key(metric)
    shown = [r for r in rows if r["state"] != "waiting"]  # enqueued, not started: nothing to show yet
    order = sorted(shown, key=lambda r: (r["val_delta_mtl"] is None, -(r["val_delta_mtl"] or 0.0)))
    if top:
        order = order[:top]
    names = sorted({k for r in rows for k in r["params"]}, key=lambda k: (k != "sparsity", k))
    out = []
    for r in order:
        fits = {True: "yes", False: "OVER", None: ""}[r["feasible"]]
        out.append([("*" if r["number"] == best else "") + str(r["number"]), r["state"],
                    *[f"{r['params'][k]:.4g}" if k in r["params"] else "" for k in names],
                    "" if r["val_delta_mtl"] is None else f"{r['val_delta_mtl']:+.2f}",
                    "" if r["test_delta_mtl"] is None else f"{r['test_delta_mtl']:+.2f}",
                    "" if r[size_key] is None else format_count(r[size_key]), fits,
                    "" if r["seconds"] is None else f"{r['seconds']:.0f}"])
    headers = ["trial", "state", *[("λ_s" if k == "sparsity" else "τ" if k == "target" else
                                    k.replace("target.", "τ ")) for k in names],
               "val Δ_MTL %", "test Δ_MTL %", metric, f"≤ {format_count(limit)}" if limit else "budget", "s"]
    return tabulate(out, headers=headers, tablefmt="simple", disable_numparse=True)


def pareto_front(rows: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The finished trials within the budget that no other beats on both val Δ_MTL and size, smallest first."""
    size_key = _size_key(metric)
    done = [r for r in rows if r["val_delta_mtl"] is not None and r[size_key] is not None and r["feasible"] is not False]
    front = [r for r in done if not any(
        o[size_key] <= r[size_key] and o["val_delta_mtl"] >= r["val_delta_mtl"]
        and (o[size_key] < r[size_key] or o["val_delta_mtl"] > r["val_delta_mtl"]) for o in done)]
    return [dict(r) for r in sorted(front, key=lambda r: (r[size_key], -r["val_delta_mtl"]))]


def plot_study(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str, limit: int | None,
               best: int | None = None) -> None:
    """Val Δ_MTL against the pruned size (budget line, feasible front) and against the trial number, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from branchnas.rundir import atomic_savefig

    size_key = _size_key(metric)
    done = [r for r in rows if r["val_delta_mtl"] is not None and r[size_key] is not None]
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(11, 4.2))
    for feasible, colour, label in ((True, "tab:blue", "within the budget"), (False, "tab:red", "over the budget"),
                                    (None, "tab:gray", "no budget")):
        pts = [r for r in done if r["feasible"] is feasible]
        if pts:
            ax.scatter([r[size_key] for r in pts], [r["val_delta_mtl"] for r in pts], c=colour, label=label, s=28)
    front = pareto_front(rows, metric)
    if front:
        ax.step([r[size_key] for r in front], [r["val_delta_mtl"] for r in front], where="post", c="tab:blue",
                alpha=0.5, label="front (feasible)")
    for r in done:
        if r["number"] == best:
            ax.scatter([r[size_key]], [r["val_delta_mtl"]], marker="*", s=220, c="gold", edgecolors="k",
                       zorder=5, label=f"best (trial {best})")
    if limit:
        ax.axvline(limit, c="k", ls="--", lw=1, label="budget")
    ax.set_xlabel(f"pruned network's {metric}")
    ax.set_ylabel("val Δ_MTL (%)")
    ax.set_title("trials: Δ_MTL against size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    states = {"complete": "tab:blue", "pruned": "tab:orange", "fail": "tab:red", "running": "tab:gray",
              "waiting": "tab:gray"}
    for r in rows:
        y = r["val_delta_mtl"]
        if y is not None:
            hist.scatter([r["number"]], [y], c=states.get(r["state"], "k"), s=24,
                         marker="o" if r["feasible"] is not False else "x")
    handles = [plt.Line2D([], [], ls="", marker="o", c=c, label=s) for s, c in states.items()
               if any(r["state"] == s for r in rows)]
    handles.append(plt.Line2D([], [], ls="", marker="x", c="k", label="over the budget"))
    hist.legend(handles=handles, fontsize=8)
    hist.set_xlabel("trial")
    hist.set_ylabel("val Δ_MTL (%)")
    hist.set_title("trials in order")
    hist.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path)


def study_summary(study: optuna.Study, url: str) -> dict[str, Any]:
    """Counts and names for reports (the storage URL masked)."""
    from collections import Counter

    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    return {"study": study.study_name, "storage": mask_url(url), "trials": dict(states),
            "finished": finished_count(study), "target": study.user_attrs.get(TARGET_ATTR)}
