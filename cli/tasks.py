"""`branchnas tasks`: the task kinds with their losses, metrics and tensor formats."""

from __future__ import annotations

import click


@click.command(name="tasks")
@click.argument("kind", required=False)
def command(kind: str | None) -> None:
    """List the task kinds a recipe's [[tasks]] can use, or describe one KIND.

    For each kind: the loss (and its `loss = "mse"` override where there is one), the metrics with the primary
    one first (↑ higher is better, ↓ lower is better), the head output and the target format.
    Rates (accuracy, IoU, F-score) are fractions in [0, 1]; angles are in degrees.
    """
    from branchnas.errors import UserError, unknown_choice
    from branchnas.tasks import KIND_INFO

    if kind is not None and kind not in KIND_INFO:
        raise UserError(unknown_choice("task kind", kind, KIND_INFO))
    kinds = [kind] if kind else list(KIND_INFO)
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
