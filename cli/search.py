"""`branchnas search`: the cheapest-cost tree within a budget (stage 3)."""

from __future__ import annotations

import click
from branchnas_cli._options import (
    emit_json,
    force_option,
    json_option,
    load,
    recipe_options,
    run_stage_command,
    stdout_to_stderr,
)


@click.command(name="search")
@recipe_options
@click.option("--budget", help="Largest tree size, e.g. 10M, 2.5M, 500k, 1.2G, 1500000, or 8ms / 500us with "
              "--metric latency (default: the recipe's).")
@click.option("--metric", type=click.Choice(["params", "flops", "latency"]),
              help="What the budget counts (fvcore: 1 multiply-add = 1 flop; latency: seconds per image from a "
                   "per-block table, search.latency_table or measured here).")
@click.option("--mode", type=click.Choice(["auto", "exact", "scalable"]), help="Exact search, scalable search, or auto.")
@click.option("--top", type=click.IntRange(min=1), help="List the K best trees within the budget.")
@click.option("--affinity", "affinity_file", type=click.Path(dir_okay=False),
              help="Search on this affinity .npz instead of running pretrain and affinity.")
@click.option("--pareto/--no-pareto", default=True, help="Print the Pareto front (best cost at every budget).")
@force_option
@json_option
def command(recipe, overrides, budget, metric, mode, top, affinity_file, pareto, force, as_json):  # noqa: ANN001
    """Find the branched architecture with the least task clustering cost within a budget.

    Loads the affinity tensor (running pretrain and affinity first if needed, or reading
    --affinity FILE with no training at all), measures every block with fvcore, and prints
    the chosen tree with its params, FLOPs and cost next to the all-shared and all-separate
    extremes. Writes search/tree.json, search/pareto.json and PNGs into the run directory.

    With --json: {run_dir, skipped, tree, cost, params, flops, metric, budget, mode,
    trees_considered, seconds, min_size, max_size, ranked, runners_up, extremes, pareto,
    files}; tree is the chosen tree (tasks, points, partitions, groups_per_point).

    \b
    Examples:
      branchnas search --budget 1M
      branchnas search --budget 200M --metric flops --top 3
      branchnas search --metric latency --budget 8ms --set search.latency_table=profile.json
      branchnas search recipes/celeba.toml --affinity affinity.npz --budget 2.2M
    """
    from branchnas.budget import format_count
    from branchnas.search import format_pareto, format_result, format_summary
    from branchnas.stages.search import read_result

    sets = list(overrides)
    for key, value in (("budget", budget), ("metric", metric), ("mode", mode), ("top", top)):
        if value is not None:
            sets.append(f"search.{key}={value!s}" if key != "budget" else f'search.budget="{value}"')
    with stdout_to_stderr(as_json):
        resolved = load(recipe, tuple(sets))
        options = {"affinity_file": affinity_file} if affinity_file else {}
        rundir, outcome = run_stage_command(resolved, "search", force=force, options=options)
    if as_json:
        from branchnas.report import search_data

        emit_json({"run_dir": str(rundir.path), "skipped": bool(outcome.get("skipped")),
                   **search_data(rundir, pareto=pareto)})
        return
    result, extremes = read_result(rundir)
    click.echo(format_result(result))
    click.echo("")
    click.echo(format_summary(result, extremes))
    if pareto and result.pareto:
        click.echo("\nPareto front (best cost for every budget; * = chosen):")
        click.echo(format_pareto(result.pareto, result.metric, chosen=result.best))
    folder = rundir.path / "search"
    state = "unchanged inputs: kept" if outcome.get("skipped") else "wrote"
    click.echo(f"\n{state} {folder}/tree.json, pareto.json, tree.png, pareto.png "
               f"(chosen: {format_count(result.best.params)} params)")
