"""Task heads: output shapes per kind, scriptability, and that they stay small."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from branchnas.backbones import build_backbone
from branchnas.cost import count_params
from branchnas.errors import UserError
from branchnas.heads import DenseHead, LinearHead, build_head
from branchnas.recipe import TASK_KINDS, BackboneConfig
from branchnas.tasks import Task

B = 2

# kind -> (task options, expected output shape for a (B, 16, h, w) input and a 30x34 image)
CASES = {
    "classification": ({"num_classes": 7}, (B, 7)),
    "attribute": ({}, (B,)),
    "regression": ({"channels": 3}, (B, 3)),
    "segmentation": ({"num_classes": 5}, (B, 5, 30, 34)),
    "depth": ({}, (B, 1, 30, 34)),
    "normals": ({"channels": 3}, (B, 3, 30, 34)),
    "edges": ({}, (B, 1, 30, 34)),
}

SCRIPT_WARNING = "ignore:.*torch.jit.script.*is deprecated:FutureWarning"


def _task(kind: str) -> Task:
    return Task(kind, kind, kind, **CASES[kind][0])


def test_every_task_kind_has_a_case():
    assert set(CASES) == set(TASK_KINDS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_output_shapes_follow_the_contract(kind):
    # 30x34 is not a multiple of the reduction: dense outputs must still be exactly 30x34.
    head = build_head(_task(kind), 16, 4, (30, 34))
    out = head(torch.randn(B, 16, 8, 9))
    assert tuple(out.shape) == CASES[kind][1]
    assert isinstance(head, DenseHead if _task(kind).dense else LinearHead)


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.filterwarnings(SCRIPT_WARNING)
def test_heads_are_scriptable_with_the_same_outputs(kind):
    head = build_head(_task(kind), 16, 4, (30, 34)).eval()
    scripted = torch.jit.script(head)
    x = torch.randn(B, 16, 8, 9)
    with torch.no_grad():
        assert torch.equal(scripted(x), head(x))


def test_attribute_head_returns_one_logit_per_image_from_a_linear_layer():
    head = build_head(_task("attribute"), 4, 4, 16)
    x = torch.randn(3, 4, 2, 2)
    expected = head.fc(x.mean(dim=(2, 3)))[:, 0]
    torch.testing.assert_close(head(x), expected)


def test_dense_head_upsamples_bilinearly_to_the_image_size():
    head = build_head(_task("depth"), 8, 8, (16, 24)).eval()
    x = torch.randn(1, 8, 2, 3)
    low = head.decoder(x)
    expected = torch.nn.functional.interpolate(low, size=(16, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(head(x), expected)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_heads_are_small_next_to_the_resnet20_encoder(kind):
    backbone = build_backbone(BackboneConfig(name="resnet20"), 3, (32, 32))
    head = build_head(_task(kind), backbone.out_channels, backbone.reduction, (32, 32))
    assert count_params(head) < 0.2 * count_params(backbone)


def test_dense_head_width_is_capped_for_wide_encoders():
    head = build_head(_task("segmentation"), 2048, 8, (32, 32))
    assert head.decoder[0].out_channels == 128
    narrow = build_head(_task("segmentation"), 20, 4, (32, 32))
    assert narrow.decoder[0].out_channels == 20


@dataclass(frozen=True)
class _StandIn:
    name: str
    kind: str
    out_channels: int = 1
    dense: bool = False


def test_a_kind_without_a_head_is_a_user_error():
    with pytest.raises(UserError, match="unknown kind of task 't' 'ranking'; choose one of: attribute, classification, regression"):
        build_head(_StandIn("t", "ranking"), 16, 4, (32, 32))


def test_non_positive_channels_are_refused():
    with pytest.raises(ValueError, match="in_channels and reduction must be >= 1; got 0 and 4"):
        build_head(_task("depth"), 0, 4, (32, 32))
