"""`branchnas report`: print the report of a run."""

from __future__ import annotations

import click


@click.command(name="report")
@click.argument("run", required=False, type=click.Path())
@click.option("--rewrite", is_flag=True, help="Rebuild report.md from the run's artifacts first.")
def command(run: str | None, rewrite: bool) -> None:
    """Print report.md of RUN (a run directory, or a recipe whose run it names).

    With no RUN it uses the run of ./branchnas.toml, else of the built-in default recipe.
    """
    from branchnas.report import REPORT, resolve_run, write_report

    rundir = resolve_run(run)
    path = rundir.path / REPORT
    if rewrite or not path.exists():
        with rundir.locked():
            path = write_report(rundir)
    click.echo(path.read_text(), nl=False)
    click.echo(f"\n(figures are PNG files next to {path})", err=True)
