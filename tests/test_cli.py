import subprocess
import sys
import textwrap

import pytest
from branchnas_cli.main import COMMANDS, cli, main
from click.testing import CliRunner

from branchnas import __version__


def run_main(args, monkeypatch=None):
    """Run the real entry point (with its error handling) and capture exit code and output."""
    code = textwrap.dedent(
        f"""
        import sys
        from branchnas_cli.main import main
        try:
            main({args!r})
        except SystemExit as exc:
            code = exc.code
        print("TORCH_IMPORTED=" + str("torch" in sys.modules), file=sys.stderr)
        sys.exit(code)
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["--version"], []])
def test_help_and_version_do_not_import_torch(args):
    proc = run_main(args)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_IMPORTED=False" in proc.stderr


def test_help_lists_every_command_with_its_summary():
    proc = run_main(["--help"])
    flat = " ".join(proc.stdout.split())  # click wraps long summaries
    for name, summary in COMMANDS.items():
        assert f"{name} {summary}" in flat
    assert "Stage 3: find the cheapest-cost tree" in proc.stdout


def test_version():
    proc = run_main(["--version"])
    assert proc.stdout.strip() == f"branchnas, version {__version__}"


def test_python_dash_m_works():
    proc = subprocess.run([sys.executable, "-m", "branchnas", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and __version__ in proc.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and name in result.output


def test_unknown_command_suggests_the_closest_one():
    proc = run_main(["serch"])
    assert proc.returncode == 2
    assert "unknown command 'serch'" in proc.stderr and "(did you mean 'search'?)" in proc.stderr


def test_a_user_error_is_one_line_exit_2_and_no_traceback(in_tmp):
    proc = run_main(["recipe", "--set", "pretrain.epoch=2"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("TORCH_IMPORTED")]
    assert lines == [
        "Error: pretrain.epoch: unknown key (did you mean 'epochs'?); valid keys here: epochs, lr, "
        "optimizer, momentum, weight_decay, schedule, warmup_epochs, patience, grad_clip, log, device, precision, "
        "sync_bn, concurrent, parallel"
    ]
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(in_tmp):
    proc = run_main(["--debug", "recipe", "missing.toml"])
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert "Error: recipe file 'missing.toml' does not exist" in proc.stderr


def test_recipe_command_prints_a_recipe_that_reads_back(in_tmp):
    result = CliRunner().invoke(cli, ["recipe", "--set", "seed=3"])
    assert result.exit_code == 0, result.output
    (in_tmp / "branchnas.toml").write_text(result.output)
    check = CliRunner().invoke(cli, ["recipe", "--check"])
    assert check.exit_code == 0 and check.output.startswith("ok: recipe 'shapes'")
    from branchnas.recipe import load_recipe

    assert load_recipe(None).seed == 3


def test_main_turns_user_errors_into_exit_2(in_tmp, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["recipe", "nope.toml"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "Error: recipe file 'nope.toml' does not exist; pass a path to a .toml recipe (see recipes/)"
    )
