"""How idle OpenMP threads wait, and what it costs training: the CLI's setting against the others.

The CLI sets ``GOMP_SPINCOUNT=10000`` before torch loads (unless the user set
``OMP_WAIT_POLICY``): idle threads spin briefly, then sleep. This script times one training
step of the default encoder (ResNet-20, batch 64 at 32x32, SGD) in a fresh process for each
setting, alone on the machine and with a second identical process beside it (a busy CPU),
repeats interleaved, and prints the medians and their ratios to the CLI's setting::

    python bench/omp_wait.py --repeats 3

A setting can only be compared in fresh processes: libgomp reads the variables once, when
it loads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

#: name -> environment changes (None removes the variable)
SETTINGS = {
    "branchnas (GOMP_SPINCOUNT=10000)": {"GOMP_SPINCOUNT": "10000", "OMP_WAIT_POLICY": None},
    "libgomp default spin": {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": None},
    "OMP_WAIT_POLICY=PASSIVE": {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "PASSIVE"},
}


def child(steps: int, threads: int) -> None:
    """Print the mean milliseconds of a training step (after 5 warm-up steps)."""
    import torch

    from branchnas.backbones import build_backbone
    from branchnas.recipe import BackboneConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="resnet20"), 3, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(64, 3, 32, 32)

    def step() -> None:
        out = model(x)
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print((time.perf_counter() - start) / steps * 1000)


def _env(changes: dict[str, str | None]) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _time(changes: dict[str, str | None], copies: int, steps: int, threads: int) -> float:
    """Mean ms per step of ``copies`` processes started together (their mean)."""
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps), "--threads", str(threads)]
    procs = [subprocess.Popen(cmd, env=_env(changes), stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a timing process failed: {outs}")
    return statistics.mean(float(o.strip().splitlines()[-1]) for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per process")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps, args.threads)
        return
    results: dict[tuple[str, int], list[float]] = {(name, c): [] for name in SETTINGS for c in (1, 2)}
    for _ in range(args.repeats):  # interleaved: every setting sees the same machine
        for name, changes in SETTINGS.items():
            for copies in (1, 2):
                results[name, copies].append(_time(changes, copies, args.steps, args.threads))
    print(f"ResNet-20 training step, batch 64 at 32x32, {args.threads} torch threads per process, "
          f"{args.steps} steps, median of {args.repeats} interleaved repeats")
    ours = {c: statistics.median(results[next(iter(SETTINGS)), c]) for c in (1, 2)}
    print(f"{'setting':34} {'alone ms':>9} {'ratio':>6} {'2 procs ms':>11} {'ratio':>6}")
    for name in SETTINGS:
        alone, busy = (statistics.median(results[name, c]) for c in (1, 2))
        print(f"{name:34} {alone:9.1f} {alone / ours[1]:6.2f} {busy:11.1f} {busy / ours[2]:6.2f}")


if __name__ == "__main__":
    main()
