"""`branchnas report`: print the report of a run."""

from __future__ import annotations

import click
from branchnas_cli._options import emit_json, json_option, note, stdout_to_stderr


@click.command(name="report")
@click.argument("run", required=False, type=click.Path())
@click.option("--rewrite", is_flag=True, help="Rebuild report.md from the run's artifacts first.")
@json_option
def command(run: str | None, rewrite: bool, as_json: bool) -> None:
    """Print report.md of RUN (a run directory, or a recipe whose run it names).

    With no RUN it uses the run of ./branchnas.toml, else of the built-in default recipe.

    With --json: {run_dir, report (the path of report.md), summary} instead of the text;
    summary is as in `branchnas run --json`.
    """
    from branchnas.report import REPORT, resolve_run, summary_data, write_report

    with stdout_to_stderr(as_json):
        rundir = resolve_run(run)
        path = rundir.path / REPORT
        if rewrite or not path.exists():
            with rundir.locked():
                path = write_report(rundir)
    if as_json:
        emit_json({"run_dir": str(rundir.path), "report": str(path), "summary": summary_data(rundir)})
        return
    click.echo(path.read_text(), nl=False)
    note(f"\n(figures are PNG files next to {path})")
