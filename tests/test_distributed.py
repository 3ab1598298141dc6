"""Several processes under torchrun: DDP, rank 0 alone writing, resume, task-parallel stage 1.

The fast tests check the pieces in one process (a patched world where they need one). The
slow ones launch two gloo processes with ``python -m torch.distributed.run --standalone``
(a free port) on tiny data, each running the real command line through a small script that
records, per rank, every file it writes through :func:`branchnas.rundir.atomic_write` (which
every artifact, checkpoint and manifest write goes through), every time it takes the run
directory's lock, and its pid. The one-process reference runs use the same entry point,
one thread per process and the same recipe.

Tolerance of the DDP match (:data:`ATOL`): DDP changes only the order of float sums (each
process averages the loss over its share of the batch, then DDP averages the gradients),
so the weights differ from one process's by rounding: one fp32 ulp of weights of size ~0.2
is 1.5e-8, which is what was measured after the 6 optimizer steps of each stage here.
``ATOL = 1e-6`` leaves room for ~60 ulps (more steps, other kernels) and is still 1000 times
smaller than what the training moves the weights by (checked: over 1e-3), so a change of the
maths (a wrong share, gradients summed instead of averaged, a process on the wrong images,
an uneven last batch left unweighted) cannot pass for rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from branchnas.errors import UserError
from branchnas.pipeline import run_stages
from branchnas.pretrain import build_single_task, parallel_mode
from branchnas.recipe import load_recipe
from branchnas.rundir import RunDir
from branchnas.stages import get_stage
from branchnas.stages._checks import check_processes
from branchnas.tasks import Task
from branchnas.training import distributed
from branchnas.weighting import WEIGHTINGS

#: See the module docstring.
ATOL = 1e-6

#: Two classification tasks on LeNet-5 (no BatchNorm anywhere), so that a DDP run's batch
#: statistics cannot differ from one process's. 67 training images: batches of 32, 32 and 3
#: (the last one split 1 + 2 over the two processes).
LENET = [
    'tasks=[{name="shape", kind="classification"}, {name="colour", kind="classification"}]',
    "backbone.name=lenet5", "data.num_train=67", "data.num_val=32", "data.num_test=32", "data.batch_size=32",
    "data.options={size = 16}", "pretrain.epochs=2", "finetune.epochs=2", "affinity.images=16",
    "affinity.batch_size=32", "pretrain.device=cpu", "finetune.device=cpu", "search.budget=100%",
]

#: Three tasks on a quarter-width ResNet-20 (as tests/test_finetune.py's tiny run).
RESNET = [
    'tasks=[{name="shape", kind="classification"}, {name="colour", kind="classification"}, '
    '{name="segmentation", kind="segmentation"}]',
    "data.num_train=64", "data.num_val=32", "data.num_test=32", "data.batch_size=32", "data.options={size = 16}",
    "backbone.width=0.25", "pretrain.epochs=1", "finetune.epochs=1", "affinity.images=16", "affinity.batch_size=32",
    "pretrain.device=cpu", "finetune.device=cpu", "search.budget=40k",
]

#: Runs the real command line (argv after the script), recording per rank in $SPY what it writes and locks.
SPY = textwrap.dedent("""
    import os, sys
    from pathlib import Path

    spy = Path(os.environ["SPY"])
    rank = os.environ.get("RANK", "0")
    (spy / f"pid-{rank}").write_text(str(os.getpid()))

    from branchnas import rundir

    def note(kind, text):
        with open(spy / f"{kind}-{rank}", "a") as fh:
            fh.write(f"{text}\\n")

    atomic_write, locked = rundir.atomic_write, rundir.RunDir.locked

    def spied_write(path, mode="wb"):
        note("writes", path)
        return atomic_write(path, mode)

    def spied_lock(self):
        note("locks", os.getpid())
        return locked(self)

    rundir.atomic_write, rundir.RunDir.locked = spied_write, spied_lock

    from branchnas_cli.main import main

    main(sys.argv[1:])
""")


def sets(out, *overrides):
    return [arg for o in (f"out={json.dumps(str(out))}", *overrides) for arg in ("--set", o)]


def env(spy):
    spy.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "SPY": str(spy), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(tmp, spy, args, processes=2, **popen):
    """The command line under torchrun with ``processes`` processes (or plainly, with 1)."""
    script = tmp / "spy.py"
    script.write_text(SPY)
    if processes == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "--monitor-interval=0.2", str(script), *args]
    return subprocess.Popen(cmd, env=env(spy), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def run(tmp, spy, args, processes=2):
    proc = launch(tmp, spy, args, processes)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def lines(path):
    return path.read_text().split() if path.exists() else []


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def weights(path):
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in saved:
        return saved["state_dict"]
    return {f"{part}.{k}": v for part in ("backbone", "head") for k, v in saved[part].items()}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


# --------------------------------------------------------------------------- fast


def test_one_process_is_rank_0_of_1_and_its_collectives_are_identities():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    obj = {"a": [1, 2]}
    assert distributed.broadcast_object(obj) is obj
    assert distributed.gather_objects(obj) == [obj] == distributed.all_gather_objects(obj)
    x = torch.arange(3.0)
    assert distributed.all_reduce_sum(x) is x
    assert distributed.share(5) == (0, 5)
    distributed.barrier()
    distributed.check_batches(33, 65)  # anything goes in one process


@pytest.fixture
def two_processes(monkeypatch):
    """A patched world of two processes, for the pieces that only compute (no collective runs)."""
    where = {"rank": 0}
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: where["rank"])
    return where


def test_the_shares_weighted_mean_loss_is_the_whole_batchs_mean(two_processes):
    images = torch.arange(5.0).view(5, 1, 1, 1)
    losses = torch.tensor([0.5, 2.0, 3.0, 7.0, 11.0], dtype=torch.float64)  # per-image losses
    parts, total = [], 0.0
    for rank in (0, 1):
        two_processes["rank"] = rank
        share, targets, weight = distributed.share_batch(images, {"y": losses})
        parts.append(share.flatten().tolist())
        # each process's loss: the mean over its share, times its weight; DDP averages them
        total += float(targets["y"].mean()) * weight / 2
    assert parts == [[0.0, 1.0], [2.0, 3.0, 4.0]]  # contiguous, in rank order
    assert total == pytest.approx(float(losses.mean()), rel=1e-12)
    two_processes["rank"] = 1
    assert distributed.share_batch(torch.zeros(32, 1, 1, 1), {})[2] == 1.0  # an even split is left as it is


def test_batches_that_do_not_split_over_the_processes_are_refused(two_processes):
    with pytest.raises(UserError, match=r"data.batch_size: 33 images per batch do not split evenly over 2 processes"):
        distributed.check_batches(33, 66)
    with pytest.raises(UserError, match=r"last batch of each epoch holds 1 image\(s\), fewer than the 2 processes"):
        distributed.check_batches(32, 65)
    distributed.check_batches(32, 66)
    distributed.check_batches(32, 64)


def test_inside_alone_a_process_works_by_itself():
    with distributed.alone():
        with distributed.alone():
            assert distributed.world_size() == 1
        assert distributed.is_main()
    assert distributed._state["alone"] == 0


def test_parallel_auto_gives_each_process_tasks_while_there_are_enough():
    assert parallel_mode("auto", 3, 2) == "tasks"
    assert parallel_mode("auto", 2, 2) == "tasks"
    assert parallel_mode("auto", 1, 2) == "data"
    assert parallel_mode("data", 7, 2) == "data"
    assert parallel_mode("tasks", 1, 2) == "tasks"


@pytest.mark.parametrize("kind", ["classification", "segmentation", "depth", "normals", "edges"])
def test_meters_merged_from_shares_measure_what_one_meter_measures(kind):
    torch.manual_seed(0)
    task = Task("t", kind, "t", num_classes=4 if kind in ("classification", "segmentation") else 0,
                channels=3 if kind == "normals" else 1)
    batches = []
    for _ in range(3):
        if kind == "classification":
            batches.append((torch.randn(6, 4), torch.randint(0, 4, (6,))))
        elif kind == "segmentation":
            batches.append((torch.randn(6, 4, 5, 5), torch.randint(0, 4, (6, 5, 5))))
        elif kind == "normals":
            batches.append((torch.randn(6, 3, 5, 5), torch.nn.functional.normalize(torch.randn(6, 3, 5, 5), dim=1)))
        else:
            batches.append((torch.randn(6, 1, 5, 5), torch.rand(6, 1, 5, 5)))
    whole, parts = task.meter(), [task.meter(), task.meter()]
    for output, target in batches:
        whole.update(output, target)
        parts[0].update(output[:2], target[:2])
        parts[1].update(output[2:], target[2:])
    merged = task.meter()
    for part in parts:
        merged.merge(part.state())
    assert merged.compute() == pytest.approx(whole.compute(), rel=1e-12, nan_ok=True)


def test_the_new_keys_at_their_defaults_leave_every_fingerprint_as_it_was():
    default = load_recipe(None)
    # at their defaults the keys are not in the stages' configs: keyed as before they existed
    assert not {"sync_bn", "parallel"} & set(get_stage("pretrain").config(default, {})["pretrain"])
    for stage in ("finetune", "compare", "tune"):
        assert "sync_bn" not in get_stage(stage).config(default, {})["finetune"]
    # how the processes share stage 1 is not what it computes; statistics over the global batch are
    pretrain = get_stage("pretrain").config
    assert pretrain(load_recipe(None, ['pretrain.parallel="data"']), {}) == pretrain(default, {})
    assert pretrain(load_recipe(None, ["pretrain.sync_bn=true"]), {}) != pretrain(default, {})
    finetune = get_stage("finetune").config
    assert finetune(load_recipe(None, ["finetune.sync_bn=true"]), {}) != finetune(default, {})


def test_weightings_that_cannot_train_under_ddp_say_why():
    refused = sorted(name for name, cls in WEIGHTINGS.items() if cls.ddp_conflict)
    assert refused == ["famo", "graddrop", "gradnorm", "gradvac", "imtl", "mgda", "pcgrad"]


def test_under_ddp_the_checks_refuse_before_any_work(two_processes, in_tmp):
    base = [f"out={json.dumps(str(in_tmp))}", *LENET]
    with pytest.raises(UserError) as err:
        get_stage("finetune").check(load_recipe(None, [*base, 'finetune.weighting="pcgrad"']), {})
    assert str(err.value).startswith("finetune.weighting: 'pcgrad' cannot train under torchrun (DDP): it works on "
                                     "each process's own per-task gradients")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"finetune.sync_bn: torch's SyncBatchNorm runs on GPUs only"):
        get_stage("finetune").check(load_recipe(None, [*base, "finetune.sync_bn=true"]), {})
    with pytest.raises(UserError, match=r"data.batch_size: 31 images per batch do not split evenly"):
        get_stage("finetune").check(load_recipe(None, [*base, "data.batch_size=31"]), {})
    with pytest.raises(UserError, match=r"data.num_train: the last batch of each epoch holds 1 image"):
        get_stage("finetune").check(load_recipe(None, [*base, "data.num_train=65"]), {})
    with pytest.raises(UserError, match=r"pretrain.device: 'cuda:1' names one GPU, but under torchrun"):
        check_processes(load_recipe(None, [*base, 'pretrain.device="cuda:1"']), "pretrain")
    # two models over two processes: each trains its own (no DDP), so the batch does not matter
    get_stage("pretrain").check(load_recipe(None, [*base, "data.batch_size=31"]), {})
    with pytest.raises(UserError, match=r"data.batch_size: 31 images"):
        get_stage("pretrain").check(load_recipe(None, [*base, "data.batch_size=31", 'pretrain.parallel="data"']), {})
    assert not (in_tmp / "shapes").exists()


def test_another_process_than_rank_0_never_takes_the_lock_nor_writes(two_processes, in_tmp, monkeypatch):
    """The protocol as rank 1 sees it: it does what rank 0 says, and touches nothing itself."""
    two_processes["rank"] = 1
    said = []

    def broadcast(obj=None):
        said.append(obj)
        return ("done", {"status": "done", "skipped": True})

    def no_lock(self):
        raise AssertionError("rank 1 took the lock")

    monkeypatch.setattr(distributed, "broadcast_object", broadcast)
    monkeypatch.setattr(RunDir, "locked", no_lock)
    recipe = load_recipe(None, [f"out={json.dumps(str(in_tmp))}", *LENET])
    _, results = run_stages(recipe, ["search"], progress=False)
    assert list(results) == ["pretrain", "affinity", "search"]
    assert all(r["skipped"] for r in results.values())
    assert said == [None, None, None]  # it only ever listened
    assert not (in_tmp / "shapes").exists()

    def stop(obj=None):
        return ("stop", "RunDirLocked: in use")

    monkeypatch.setattr(distributed, "broadcast_object", stop)
    with pytest.raises(UserError, match=r"rank 0 stopped at stage 'pretrain' \(RunDirLocked: in use\)"):
        run_stages(recipe, ["search"], progress=False)


# --------------------------------------------------------------------------- several processes


@pytest.mark.slow
def test_ddp_matches_one_process_and_rank_0_alone_writes_and_locks(tmp_path):
    """`branchnas run --until finetune` over 2 gloo processes, stage 1 and 4 under DDP."""
    args = ["run", "--until", "finetune", *sets("runs", *LENET, 'pretrain.parallel="data"')]
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    ddp.mkdir(), one.mkdir()
    run(ddp, ddp / "spy", args)
    run(one, one / "spy", args, processes=1)
    a, b = ddp / "runs" / "shapes", one / "runs" / "shapes"

    # the same weights, to rounding (see ATOL), and a test that could fail: training moved them far more
    recipe = load_recipe(None, [f"out={json.dumps(str(ddp / 'runs'))}", *LENET])
    for task in ("shape", "colour"):
        trained = weights(a / "pretrain" / f"{task}.pt")
        assert max_diff(trained, weights(b / "pretrain" / f"{task}.pt")) <= ATOL
        saved = torch.load(a / "pretrain" / f"{task}.pt", map_location="cpu", weights_only=True)
        model = build_single_task(recipe, Task(**saved["task_spec"]), saved["in_channels"], tuple(saved["image_size"]))
        start = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
        assert max(float((trained[k] - v).abs().max()) for k, v in start.items()) > 1e-3
    assert max_diff(weights(a / "finetune" / "model.pt"), weights(b / "finetune" / "model.pt")) <= ATOL
    ma, mb = (json.loads((r / "pretrain" / "metrics.json").read_text()) for r in (a, b))
    for task in ("shape", "colour"):
        for split in ("val", "test"):
            assert ma["tasks"][task][split] == pytest.approx(mb["tasks"][task][split], abs=ATOL)
    ra, rb = (json.loads((r / "finetune" / "report.json").read_text()) for r in (a, b))
    losses = [[h["train_loss"][t] for h in r["training"]["history"] for t in ("shape", "colour")] for r in (ra, rb)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # summed over the processes: the global batch's

    # written once: the same files as one process, rank 1 wrote none and never took the lock
    assert files(a) == files(b)
    assert lines(ddp / "spy" / "writes-1") == [] and lines(ddp / "spy" / "locks-1") == []
    assert (a / ".lock").read_text() == f"pid {(ddp / 'spy' / 'pid-0').read_text()}"
    manifest = json.loads((a / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["pretrain", "affinity", "search", "finetune"]
    assert all(entry["status"] == "done" for entry in manifest["stages"].values())


@pytest.mark.slow
def test_task_parallel_pretraining_writes_what_one_process_writes(tmp_path):
    args = ["pretrain", *sets("runs", *RESNET, 'pretrain.parallel="tasks"')]
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    ddp.mkdir(), one.mkdir()
    run(ddp, ddp / "spy", args)
    run(one, one / "spy", args, processes=1)
    a, b = ddp / "runs" / "shapes" / "pretrain", one / "runs" / "shapes" / "pretrain"
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    for task in ("shape", "colour", "segmentation"):
        assert max_diff(weights(a / f"{task}.pt"), weights(b / f"{task}.pt")) == 0.0
    assert files(a.parent) == files(b.parent)
    # rank 1 trained colour (the tasks go round-robin) and wrote only its per-epoch checkpoint
    assert set(lines(ddp / "spy" / "writes-1")) == {"runs/shapes/.staging/pretrain/ckpt/colour.pt"}
    assert lines(ddp / "spy" / "locks-1") == []


def _pid_of_rank(spy, rank, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = spy / f"pid-{rank}"
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} did not start")


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_a_rerun_resumes(tmp_path):
    args = ["pretrain", *sets("runs", *LENET, 'pretrain.parallel="data"', "pretrain.epochs=40")]
    spy = tmp_path / "spy"
    proc = launch(tmp_path, spy, args)
    ckpt = tmp_path / "runs" / "shapes" / ".staging" / "pretrain" / "ckpt" / "shape.pt"
    victim = _pid_of_rank(spy, 1)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), proc.communicate()[1][-3000:]
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun stopped rank 0 too
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert 1 <= saved["epoch"] < 40
    entry = json.loads((tmp_path / "runs" / "shapes" / "manifest.json").read_text())["stages"]["pretrain"]
    # rank 0 lost its peer in a collective ("failed"), or torchrun stopped it first ("running")
    assert entry["status"] in ("running", "failed") and entry["attempt"]

    for path in spy.iterdir():
        path.unlink()
    run(tmp_path, spy, args)
    done = torch.load(tmp_path / "runs" / "shapes" / "pretrain" / "shape.pt", map_location="cpu", weights_only=True)
    assert done["epochs"] == 40
    # the epochs before the kill were resumed, not trained again (their timings are the saved ones)
    assert done["history"][: saved["epoch"]] == saved["history"]
    assert json.loads((tmp_path / "runs" / "shapes" / "manifest.json").read_text())["stages"]["pretrain"]["status"] == "done"


GATED_CHECK = textwrap.dedent("""
    import sys
    import torch
    from branchnas.data import load_splits
    from branchnas.finetune import build_branched, build_objective
    from branchnas.recipe import load_recipe
    from branchnas.rundir import RunDir
    from branchnas.stages.search import read_tree
    from branchnas.training import Trainer, distributed
    from branchnas.variants import get_variant
    from branchnas.weighting import get_weighting

    distributed.init_from_env()
    rundir = RunDir(sys.argv[1])
    recipe = load_recipe(rundir.path / "recipe.toml", ['finetune.variant="gated"', "finetune.epochs=2"])
    splits, tasks = load_splits(recipe)
    variant = get_variant("gated", recipe)
    net = build_branched(recipe, rundir, read_tree(rundir), variant=variant)
    assert net.gated_layers()
    weighting = get_weighting("uncertainty", tasks, seed=0)
    Trainer(net, tasks, recipe.finetune, batch_size=32, seed=0, weighting=weighting, variant=variant, progress=False,
            objective=build_objective(recipe, rundir, net, tasks)).fit(splits["train"], splits["val"])
    state = torch.cat([t.detach().double().reshape(-1) for t in [*net.parameters(), *net.buffers(), weighting.log_vars]])
    states = distributed.all_gather_objects(state)
    if distributed.is_main():
        print("max difference between the processes:", float((states[0] - states[1]).abs().max()))
    distributed.shutdown()
""")


@pytest.mark.slow
def test_the_gated_variant_trains_under_ddp_and_the_processes_stay_identical(tmp_path):
    """The gates' own optimizer, their regulariser and the uncertainty weights all stay in step."""
    run(tmp_path, tmp_path / "spy", ["search", *sets("runs", *RESNET)], processes=1)
    script = tmp_path / "gated.py"
    script.write_text(GATED_CHECK)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "runs" / "shapes")], env=env(tmp_path / "spy"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max difference between the processes: 0.0" in proc.stdout
