"""`branchnas tasks`: the task kinds with their losses, metrics and tensor formats."""

from __future__ import annotations

import click
from branchnas_cli._options import emit_json, json_option


@click.command(name="tasks")
@click.argument("kind", required=False)
@json_option
def command(kind: str | None, as_json: bool) -> None:
    """List the task kinds a recipe's [[tasks]] can use, or describe one KIND.

    For each kind: the loss (and its `loss = "mse"` override where there is one), the metrics with the primary
    one first (↑ higher is better, ↓ lower is better), the head output and the target format.
    Rates (accuracy, IoU, F-score) are fractions in [0, 1]; angles are in degrees.

    With --json: {kinds: [{name, loss, losses, metrics: [{name, higher_is_better, primary}],
    dense, output, target}]}.
    """
    from branchnas.errors import UserError, unknown_choice
    from branchnas.tasks import KIND_INFO

    if kind is not None and kind not in KIND_INFO:
        raise UserError(unknown_choice("task kind", kind, KIND_INFO))
    kinds = [kind] if kind else list(KIND_INFO)
    if as_json:
        emit_json({"kinds": [
            {"name": name, "loss": KIND_INFO[name].loss_doc, "losses": list(KIND_INFO[name].losses),
             "metrics": [{"name": metric, "higher_is_better": higher, "primary": j == 0}
                         for j, (metric, higher) in enumerate(KIND_INFO[name].metrics)],
             "dense": KIND_INFO[name].dense, "output": KIND_INFO[name].output, "target": KIND_INFO[name].target}
            for name in kinds
        ]})
        return
    for i, name in enumerate(kinds):
        info = KIND_INFO[name]
        metrics = ", ".join(
            f"{metric} {'↑' if higher else '↓'}{' (primary)' if j == 0 else ''}"
            for j, (metric, higher) in enumerate(info.metrics)
        )
        if i:
            click.echo()
        click.echo(name)
        click.echo(f"  loss     {info.loss_doc}")
        click.echo(f"  metrics  {metrics}")
        click.echo(f"  output   {info.output}")
        click.echo(f"  target   {info.target}")
