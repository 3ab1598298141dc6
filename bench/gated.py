"""The gated variant's settings against the plain network, on a finished run's chosen tree.

For a run directory whose stages 1-4 are done (``branchnas run``), this fine-tunes the chosen
tree with the gated variant once per setting (each a list of ``--set`` overrides of
``[finetune.gated]``), in its own folder under ``--out``, and prints one row per setting next
to the run's plain network: pruned params, whether they fit the search budget, test Δ_MTL, the
per-task Δ and each task's mean share of task-specific channels. Finished settings are read
back from their folders, so an interrupted sweep resumes.

Example (the sweep behind docs/variants.md, about 4 minutes per setting on 2 cores)::

    branchnas run
    python bench/gated.py runs/shapes --out /tmp/gated-sweep \\
        --setting "paper: init=1.0 lr=0.1 sparsity=0.05 targets=0.25" \\
        --setting "closed: init=-1.0 lr=10 sparsity=0" \\
        --setting "E4: init=0.5 lr=10 sparsity=30 targets=0.05"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parse(setting: str) -> tuple[str, list[str]]:
    """``"name: key=value key=value"`` -> (name, ``finetune.gated.key=value`` overrides)."""
    name, _, rest = setting.partition(":")
    overrides = [f"finetune.gated.{item}" for item in rest.split()]
    return name.strip(), overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory with stages 1-4 done, e.g. runs/shapes")
    parser.add_argument("--setting", action="append", required=True,
                        help='"name: key=value ..." with keys of [finetune.gated]; repeat for several')
    parser.add_argument("--out", required=True, help="folder for the gated fine-tunes")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="further recipe overrides")
    args = parser.parse_args(argv)

    from branchnas.finetune import finetune_tree
    from branchnas.recipe import load_recipe
    from branchnas.rundir import RunDir
    from branchnas.stages.finetune import read_report
    from branchnas.stages.search import read_tree

    run = Path(args.run)
    base = [f"out={json.dumps(str(run.parent))}", f"name={run.name}", *args.extra]
    rundir = RunDir(run)
    plain = read_report(rundir)
    tasks = [t["name"] for t in plain["tasks"]]
    rows = [(f"{plain.get('variant', 'plain')} (stage 4)", plain, None)]
    for setting in args.setting:
        name, overrides = _parse(setting)
        recipe = load_recipe(str(run / "recipe.toml"), [*base, *overrides])
        started = time.perf_counter()
        report = finetune_tree(recipe, rundir, read_tree(rundir), Path(args.out) / name, desc=name, variant="gated")
        rows.append((name, report, time.perf_counter() - started))
        print(f"{name}: done in {rows[-1][2]:.0f} s", file=sys.stderr)

    header = ["setting", "params", "budget", "Δ_MTL %", *[f"Δ {t}" for t in tasks], "own channels % per task"]
    print(" | ".join(header))
    for name, report, _ in rows:
        budget = report.get("budget") or {}
        fits = "-" if budget.get("limit") is None else ("fits" if budget["within"] else "OVER")
        gates = (report.get("gates") or {}).get("openness", {})
        own = []
        for t in tasks:
            shares = [v[t] for v in gates.values() if t in v]
            own.append(f"{t} {100 * sum(shares) / len(shares):.0f}" if shares else f"{t} -")
        cells = [name, f"{report['params']:,}", fits, f"{100 * report['delta_mtl']:+.2f}",
                 *[f"{100 * report['delta_per_task'][t]:+.2f}" for t in tasks], ", ".join(own) if gates else "-"]
        print(" | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
