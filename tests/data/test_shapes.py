"""The built-in shapes dataset: determinism, target consistency, factor independence."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2_contingency
from sklearn.metrics import mutual_info_score

from branchnas.data import get_family
from branchnas.data.shapes import COLOURS, FACTORS, SHAPES, ShapesOptions, generate
from branchnas.errors import RecipeError

SMALL = ShapesOptions(size=32)


@pytest.fixture(scope="module")
def scenes():
    return generate(120, seed=7, options=SMALL)


@pytest.fixture(scope="module")
def many():
    """A large sample at the smallest size, for the statistics."""
    return generate(4000, seed=11, options=ShapesOptions(size=16))


def test_same_seed_same_bytes_and_other_seeds_or_splits_differ():
    a = generate(40, seed=3, options=SMALL)
    b = generate(40, seed=3, options=SMALL)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    other_seed = generate(40, seed=4, options=SMALL)
    other_split = generate(40, seed=3, split="val", options=SMALL)
    assert a["image"].tobytes() != other_seed["image"].tobytes()
    assert a["image"].tobytes() != other_split["image"].tobytes()


def test_the_first_images_do_not_depend_on_how_many_are_asked_for():
    long = generate(300, seed=5, options=SMALL)  # crosses a chunk boundary
    short = generate(40, seed=5, options=SMALL)
    assert all(np.array_equal(long[k][:40], short[k]) for k in short)


def test_arrays_follow_the_tensor_contract(scenes):
    n, s = 120, 32
    assert scenes["image"].shape == (n, 3, s, s) and scenes["image"].dtype == np.uint8
    assert scenes["segmentation"].shape == (n, s, s)
    assert set(np.unique(scenes["segmentation"])) <= set(range(len(SHAPES) + 1))
    assert scenes["depth"].shape == (n, 1, s, s) and (scenes["depth"] > 0).all()
    norms = np.linalg.norm(scenes["normals"], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert set(np.unique(scenes["edges"])) == {0, 1}
    assert scenes["distance"].shape == (n, 1)
    assert set(np.unique(scenes["floor"])) == {0.0, 1.0}


def test_background_is_behind_every_object(scenes):
    depth = scenes["depth"][:, 0]
    background = scenes["segmentation"] == 0
    for i in range(len(depth)):
        assert depth[i][background[i]].min() > depth[i][~background[i]].max()


def test_shape_is_the_class_covering_most_pixels(scenes):
    seg = scenes["segmentation"].reshape(len(scenes["shape"]), -1).astype(np.int64)
    counts = np.stack([np.bincount(row, minlength=len(SHAPES) + 1) for row in seg])
    np.testing.assert_array_equal(counts[:, 1:].argmax(axis=1), scenes["shape"])


def test_count_is_the_number_of_visible_shape_classes(scenes):
    # Shapes within one scene are distinct classes, so classes present = objects present.
    present = [len(np.unique(seg)) - 1 for seg in scenes["segmentation"]]
    np.testing.assert_array_equal(np.array(present), scenes["count"] + SMALL.min_objects)


def _surface_change(seg: np.ndarray, depth: np.ndarray):
    """Horizontal and vertical neighbour pairs that show different surfaces.

    Different objects are different classes or, for the background, far away; every
    occlusion jumps in depth by well over the largest in-plane step of one pixel.
    """
    dx = (seg[:, :, 1:] != seg[:, :, :-1]) | (np.abs(np.diff(depth, axis=2)) > 0.25)
    dy = (seg[:, 1:, :] != seg[:, :-1, :]) | (np.abs(np.diff(depth, axis=1)) > 0.25)
    return dx, dy


def test_edges_are_where_the_surface_changes(scenes):
    seg, depth = scenes["segmentation"], scenes["depth"][:, 0]
    dx, dy = _surface_change(seg, depth)
    expected = np.zeros(seg.shape, dtype=bool)
    expected[:, :, 1:] |= dx
    expected[:, :, :-1] |= dx
    expected[:, 1:, :] |= dy
    expected[:, :-1, :] |= dy
    np.testing.assert_array_equal(scenes["edges"][:, 0].astype(bool), expected)


def test_edges_are_the_boundary_of_the_segmentation_so_they_share_its_factors(scenes):
    seg = scenes["segmentation"]
    dx, dy = seg[:, :, 1:] != seg[:, :, :-1], seg[:, 1:, :] != seg[:, :-1, :]
    boundary = np.zeros(seg.shape, dtype=bool)
    boundary[:, :, 1:] |= dx
    boundary[:, :, :-1] |= dx
    boundary[:, 1:, :] |= dy
    boundary[:, :-1, :] |= dy
    np.testing.assert_array_equal(scenes["edges"][:, 0].astype(bool), boundary)
    factors_of = {t: {f for f, group in FACTORS.items() if t in group} for t in ("segmentation", "edges")}
    assert factors_of["segmentation"] == factors_of["edges"]


def test_normals_match_the_depth_gradient_inside_surfaces(scenes):
    depth = scenes["depth"][:, 0].astype(np.float64)
    size = depth.shape[-1]
    # x and y are measured in image widths, so one pixel is 1/size.
    gy, gx = np.gradient(depth, 1.0 / size, axis=(1, 2))
    expected = np.stack([gx, gy, -np.ones_like(gx)], axis=1)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    interior = scenes["edges"][:, 0] == 0
    interior[:, [0, -1], :] = False  # np.gradient is one-sided at the border
    interior[:, :, [0, -1]] = False
    got = scenes["normals"].transpose(0, 2, 3, 1)[interior]
    want = expected.transpose(0, 2, 3, 1)[interior]
    assert interior.sum() > 0.5 * interior.size
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_colour_is_the_colour_of_the_largest_object(scenes):
    protos = np.array(list(COLOURS.values()))
    chroma_protos = protos / protos.sum(axis=1, keepdims=True)
    right = 0
    for i in range(len(scenes["shape"])):
        region = (scenes["segmentation"][i] == scenes["shape"][i] + 1) & (scenes["edges"][i, 0] == 0)
        rgb = scenes["image"][i][:, region].astype(np.float64).mean(axis=1)
        nearest = np.argmin(np.linalg.norm(chroma_protos - rgb / rgb.sum(), axis=1))
        right += nearest == scenes["colour"][i]
    assert right >= 0.97 * len(scenes["shape"])


def test_factors_cover_every_target():
    targets = {t for group in FACTORS.values() for t in group}
    assert sorted(targets) == sorted(get_family("shapes").targets())
    assert all(len(set(group)) == len(group) for group in FACTORS.values())


def test_colour_is_independent_of_shape(many):
    table = np.zeros((len(COLOURS), len(SHAPES)))
    np.add.at(table, (many["colour"], many["shape"]), 1)
    assert chi2_contingency(table).pvalue > 0.001


def test_targets_of_different_factors_share_little_information(many):
    scalar = {"shape": many["shape"], "colour": many["colour"], "count": many["count"], "floor": many["floor"]}
    factors = {t: {f for f, group in FACTORS.items() if t in group} for t in scalar}
    for a in scalar:
        for b in scalar:
            if a < b:
                assert not factors[a] & factors[b], (a, b)
                assert mutual_info_score(scalar[a], scalar[b]) < 0.01, (a, b)
    # The same measure sees a shared factor: segmentation determines the shape label.
    dominant = np.stack([np.bincount(s.ravel(), minlength=6)[1:] for s in many["segmentation"]]).argmax(1)
    assert mutual_info_score(dominant, many["shape"]) > 1.0


def test_labels_are_balanced(many):
    for key, classes in (("shape", len(SHAPES)), ("colour", len(COLOURS)), ("count", 4)):
        freq = np.bincount(many[key], minlength=classes) / len(many[key])
        np.testing.assert_allclose(freq, 1 / classes, atol=0.03)


def test_count_classes_follow_the_options():
    family = get_family("shapes")
    options = family.parse_options({"min_objects": 2, "max_objects": 3, "size": 16})
    assert family.targets(options)["count"].num_classes == 2
    scenes = generate(30, seed=0, options=options)
    present = [len(np.unique(seg)) - 1 for seg in scenes["segmentation"]]
    np.testing.assert_array_equal(np.array(present), scenes["count"] + 2)


@pytest.mark.parametrize(("options", "message"), [
    ({"max_objects": 6}, "data.options.max_objects: expected a value <= 5"),
    ({"min_objects": 3, "max_objects": 2}, "data.options.min_objects: expected <= data.options.max_objects"),
    ({"size": 8}, "data.options.size: expected a value >= 16"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(RecipeError, match=message):
        get_family("shapes").parse_options(options)
