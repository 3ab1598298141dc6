"""`branchnas datasets`."""

from __future__ import annotations

import pytest
from branchnas_cli.datasets import command
from branchnas_cli.main import main
from click.testing import CliRunner

from branchnas.data import list_families


def test_lists_every_family_with_root_targets_and_options():
    result = CliRunner().invoke(command, [])
    assert result.exit_code == 0, result.output
    for name in list_families():
        assert f"\n{name}: " in "\n" + result.output
    assert "data.root: not needed (generated in code)" in result.output
    assert "data.root (required): img_align_celeba/, list_attr_celeba.txt" in result.output
    assert "*segmentation  segmentation (6 classes)" in result.output
    assert "    size        = 32" in result.output
    assert "40 attribute (the default tasks):" in result.output


def test_one_family_lists_every_target():
    result = CliRunner().invoke(command, ["celeba"])
    assert result.exit_code == 0
    assert result.output.startswith("celeba: ")
    assert "   *Wearing_Necktie" in result.output
    assert "shapes:" not in result.output


def test_unknown_family_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["datasets", "shape"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == ("Error: unknown dataset 'shape'; choose one of: arrays, celeba, cifar100, cityscapes, "
                           "digits, multimnist, nyuv2, shapes (did you mean 'shapes'?)")


def test_help():
    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0 and "List the dataset families" in result.output
