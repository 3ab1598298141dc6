"""`branchnas backbones`: the listing and its failures."""

from __future__ import annotations

import pytest
from branchnas_cli.backbones import command
from click.testing import CliRunner

from branchnas.errors import UserError


def test_describes_one_backbone_with_every_branch_point():
    result = CliRunner().invoke(command, ["resnet20", "--size", "32", "--granularity", "block"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("Backbones at 32x32 with 3 input channels; blocks at 'block' granularity")
    assert "one multiply-add = one flop" in lines[0]
    assert "D = 3 (stage), 9 (block)" in result.output
    assert "encoder 269k params, 40.9M FLOPs" in result.output
    rows = [line.split() for line in lines if line.strip().split(" ")[0] in {"stem", *map(str, range(1, 10))}]
    assert rows[0] == ["stem", "stem", "16", "1", "464", "475k"]
    assert [r[1] for r in rows[1:]] == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert rows[-1][2:4] == ["64", "4"]


def test_lists_every_backbone():
    result = CliRunner().invoke(command, ["--size", "32", "--in-channels", "1"])
    assert result.exit_code == 0, result.output
    assert "with 1 input channel;" in result.output
    for name, depth in [("lenet5", "D = 2 (stage), 2 (block)"), ("mobilenet_v2", "D = 4 (stage), 16 (block)"),
                        ("resnet18", "D = 4 (stage), 8 (block)"), ("resnet50", "D = 4 (stage), 16 (block)")]:
        block = result.output.split(f"\n{name}: ")[1]
        assert block.splitlines()[1].strip().startswith(depth)


def test_rectangular_sizes_are_accepted():
    result = CliRunner().invoke(command, ["lenet5", "--size", "16x32"])
    assert result.exit_code == 0, result.output
    assert "Backbones at 16x32" in result.output


@pytest.mark.parametrize("size", ["0", "big", "32x0", "3x"])
def test_bad_size_is_a_usage_error(size):
    result = CliRunner().invoke(command, ["lenet5", "--size", size])
    assert result.exit_code == 2
    assert "expected a size such as 64 or 32x64" in result.output


def test_unknown_backbone_is_a_user_error_with_a_suggestion():
    result = CliRunner().invoke(command, ["resnet5"])
    assert isinstance(result.exception, UserError)
    assert "did you mean 'resnet50'?" in str(result.exception)
