"""Helpers shared by the dataset tests: small recipes and image files."""

from __future__ import annotations

import numpy as np
import pytest

from branchnas.recipe import Recipe, recipe_from_dict, recipe_to_dict


def _recipe(dataset: str = "shapes", *, tasks: list[dict] | None = None, seed: int = 0, **data) -> Recipe:
    raw = recipe_to_dict(Recipe())
    raw["seed"] = seed
    raw["data"].update({"dataset": dataset, **data})
    raw["tasks"] = tasks or []
    return recipe_from_dict(raw)


@pytest.fixture
def make_recipe():
    """``make_recipe(dataset, tasks=[...], seed=0, **data_keys)`` -> a validated Recipe."""
    return _recipe


def save_png(path, array: np.ndarray) -> None:
    """Write ``array`` (H, W), (H, W, 3) uint8 or (H, W) uint16 as a PNG, creating folders."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def png():
    return save_png


def unnormalise(dataset, images) -> np.ndarray:
    """Batch images back on the 0..255 scale."""
    mean = np.array(dataset.mean).reshape(1, -1, 1, 1)
    std = np.array(dataset.std).reshape(1, -1, 1, 1)
    return (images.numpy() * std + mean) * 255


@pytest.fixture
def pixels():
    return unnormalise
