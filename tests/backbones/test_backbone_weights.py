"""backbone.weights: local state-dict files load, in either layout, and bad files fail clearly."""

from __future__ import annotations

import pytest
import torch
import torchvision

from branchnas.backbones import build_backbone, load_weights
from branchnas.errors import UserError
from branchnas.recipe import BackboneConfig


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["resnet20", "lenet5", "mobilenet_v2"])
def test_own_state_dict_round_trips(tmp_path, name):
    torch.manual_seed(0)
    source = build_backbone(BackboneConfig(name=name), 3, (32, 32))
    path = tmp_path / "bb.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    fresh = build_backbone(BackboneConfig(name=name), 3, (32, 32))
    assert not _same_state(fresh, source)
    loaded = build_backbone(BackboneConfig(name=name, weights=str(path)), 3, (32, 32))
    assert _same_state(loaded, source)


def test_wrapped_and_data_parallel_checkpoints_load(tmp_path):
    source = build_backbone(BackboneConfig(name="lenet5"), 3, (32, 32))
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = build_backbone(BackboneConfig(name="lenet5", weights=str(path)), 3, (32, 32))
    assert _same_state(loaded, source)


def test_reference_layout_loads_into_either_granularity(tmp_path):
    stage = build_backbone(BackboneConfig(name="resnet20"), 3, (32, 32))
    # Save in the granularity-independent reference layout (conv1.weight, layer1.0...).
    path = tmp_path / "resnet20.pt"
    torch.save({stage.reference.names[k]: v for k, v in stage.state_dict().items()}, path)
    block = build_backbone(BackboneConfig(name="resnet20", granularity="block", weights=str(path)), 3, (32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(block.eval()(x), stage.eval()(x))


def test_old_torchvision_files_without_num_batches_tracked_load(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    backbone = build_backbone(BackboneConfig(name="resnet18", weights=str(path)), 3, (32, 32))
    assert torch.equal(backbone.stem.conv1.weight, reference.conv1.weight)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match=f"backbone.weights: file '{missing}' does not exist; .*nothing is downloaded"):
        build_backbone(BackboneConfig(name="resnet20", weights=str(missing)), 3, (32, 32))


def test_unreadable_file_is_a_user_error(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match=f"cannot read '{path}' as a PyTorch file"):
        build_backbone(BackboneConfig(name="resnet20", weights=str(path)), 3, (32, 32))


def test_file_without_tensors_is_a_user_error(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(UserError, match="holds no state dict of tensors"):
        build_backbone(BackboneConfig(name="resnet20", weights=str(path)), 3, (32, 32))


def test_weights_of_another_backbone_are_refused(tmp_path):
    path = tmp_path / "lenet.pt"
    torch.save(build_backbone(BackboneConfig(name="lenet5"), 3, (32, 32)).state_dict(), path)
    with pytest.raises(UserError, match=r"none of the 4 keys in .* belong to backbone 'resnet20' .*'blocks.0.0.weight'.*"
                                        r"expected keys such as 'stem.conv1.weight' \(or CifarResNet \(resnet20\)'s 'conv1.weight'\)"):
        build_backbone(BackboneConfig(name="resnet20", weights=str(path)), 3, (32, 32))


def test_weights_saved_at_another_granularity_name_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "stage.pt"
    torch.save(build_backbone(BackboneConfig(name="resnet20"), 3, (32, 32)).state_dict(), path)
    with pytest.raises(UserError, match=r"does not match backbone 'resnet20' \(block granularity.*missing "
                                        r"'blocks.0.conv1.weight'.*; unexpected 'blocks.0.0.conv1.weight'"):
        build_backbone(BackboneConfig(name="resnet20", granularity="block", weights=str(path)), 3, (32, 32))


def test_incomplete_file_lists_the_missing_keys(tmp_path):
    state = build_backbone(BackboneConfig(name="lenet5"), 3, (32, 32)).state_dict()
    del state["blocks.1.0.bias"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"missing 'blocks.1.0.bias'$"):
        build_backbone(BackboneConfig(name="lenet5", weights=str(path)), 3, (32, 32))


def test_shape_mismatch_names_the_key_and_shapes(tmp_path):
    path = tmp_path / "half.pt"
    torch.save(build_backbone(BackboneConfig(name="resnet20", width=0.5), 3, (32, 32)).state_dict(), path)
    with pytest.raises(UserError, match=r"'stem.conv1.weight' .* has shape \(8, 3, 3, 3\) .* expects \(16, 3, 3, 3\)"):
        build_backbone(BackboneConfig(name="resnet20", weights=str(path)), 3, (32, 32))


def test_rgb_torchvision_weights_into_a_grey_backbone_name_the_torchvision_key(tmp_path):
    path = tmp_path / "tv.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(UserError, match=r"'conv1.weight' .* \(64, 3, 7, 7\) .*in_channels=1\) expects \(64, 1, 7, 7\)"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(path)), 1, (32, 32))


def test_load_weights_works_on_a_built_backbone(tmp_path):
    source = build_backbone(BackboneConfig(name="lenet5"), 1, (28, 28))
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    target = build_backbone(BackboneConfig(name="lenet5"), 1, (28, 28))
    assert load_weights(target, path) is target and _same_state(target, source)
