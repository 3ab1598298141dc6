"""`branchnas profile`: measure the per-part latency table of a recipe's network on this machine."""

from __future__ import annotations

import click
from branchnas_cli._options import emit_json, json_option, load, recipe_options, stdout_to_stderr


@click.command(name="profile")
@recipe_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="latency.json", show_default=True,
              help="Write the table (JSON) here.")
@click.option("--threads", type=click.IntRange(min=1), help="torch threads while timing (default: torch's current setting).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per call (default: the recipe's data.batch_size).")
@click.option("--repeats", type=click.IntRange(min=1), default=7, show_default=True, help="Timed rounds; the median counts.")
@click.option("--iters", type=click.IntRange(min=1), default=3, show_default=True, help="Calls per part per round.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed calls per part first.")
@click.option("--eager", is_flag=True, help="Time the parts eagerly instead of as TorchScript.")
@json_option
def command(recipe, overrides, output, threads, batch_size, repeats, iters, warmup, eager, as_json):  # noqa: ANN001
    """Measure the latency of the stem, every block and every head on this machine.

    Builds the recipe's network with random weights (speed does not depend on them) and
    times each part in eval mode without gradients, as TorchScript, on a batch of
    --batch-size images: warm-up calls, then --repeats interleaved rounds, the median round.
    Writes a table of seconds per image (with the machine, torch version, threads and batch
    size) to --output. Run it on the deployment machine and search anywhere with
    search.metric = "latency" and search.latency_table = FILE.

    With --json: the table itself.

    \b
    Examples:
      branchnas profile -o profile.json --threads 4 --batch-size 1
      branchnas search --metric latency --budget 8ms --set search.latency_table=profile.json
    """
    import json
    from pathlib import Path

    from branchnas.budget import format_seconds
    from branchnas.latency import recipe_table

    with stdout_to_stderr(as_json):
        resolved = load(recipe, overrides)
        table = recipe_table(resolved, batch_size=batch_size, threads=threads, repeats=repeats, iters=iters,
                             warmup=warmup, script=not eager)
        path = Path(output)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=2) + "\n")
    if as_json:
        emit_json(table)
        return
    parts = [("stem", table["stem"])] + [(f"block {p}", t) for p, t in zip(table["points"], table["blocks"], strict=True)]
    parts += [(f"head {name}", t) for name, t in table["heads"].items()]
    click.echo(f"{resolved.backbone.name} at {'x'.join(map(str, table['image_size']))}, batch {table['batch_size']}, "
               f"{table['threads']} thread(s), {table['mode']}, torch {table['torch']}; per image:")
    width = max(len(name) for name, _ in parts)
    for name, seconds in parts:
        click.echo(f"  {name.ljust(width)}  {format_seconds(seconds)}")
    total = table["stem"] + sum(table["blocks"]) + sum(table["heads"].values())
    click.echo(f"all shared: {format_seconds(total)} per image; wrote {path}")
