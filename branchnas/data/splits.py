"""Seeded randomness and train/val/test splitting.

Every random choice a family makes (which samples, in which split, generated content) draws
from :func:`seeded_rng`, fixed by the recipe seed and a purpose, so runs repeat exactly.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np

from branchnas.data._base import SPLITS
from branchnas.errors import DataError

__all__ = ["require_count", "seeded_rng", "split_pool", "take"]


def seeded_rng(seed: int, *tags: str | int) -> np.random.Generator:
    """A numpy generator fixed by the recipe seed and a purpose (tags), stable across runs."""
    words = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF]
    words += [zlib.crc32(t.encode()) if isinstance(t, str) else int(t) & 0xFFFFFFFF for t in tags]
    return np.random.default_rng(np.random.SeedSequence(words))


def take(pool: np.ndarray, n: int, rng: np.random.Generator, key: str, what: str) -> np.ndarray:
    """``n`` entries of ``pool`` in a seeded random order (``n = 0``: all of them).

    Raises:
        DataError: ``pool`` holds fewer than ``n`` entries.
    """
    if n > len(pool):
        raise DataError(
            f"data.{key}: asked for {n} images but {what} has {len(pool)}; "
            f"lower data.{key} (0 = all available)"
        )
    order = rng.permutation(pool)
    return order if n == 0 else order[:n]


def split_pool(
    pool: np.ndarray, sizes: dict[str, int], rng: np.random.Generator, what: str, splits: Iterable[str] = SPLITS
) -> dict[str, np.ndarray]:
    """Divide one pool of samples into disjoint seeded splits.

    A split asked for 0 images gets 10% of the pool if it is ``val`` or ``test``, and
    everything left over if it is ``train``.

    Raises:
        DataError: the sizes asked for add up to more than the pool holds.
    """
    splits = list(splits)
    order = rng.permutation(pool)
    wanted = {s: sizes[s] or (0 if s == "train" else max(1, len(pool) // 10)) for s in splits}
    fixed = sum(wanted.values())
    if fixed > len(order) or (sizes.get("train", 1) == 0 and fixed >= len(order)):
        asked = " + ".join(f"num_{s}={sizes[s]}" for s in splits)
        raise DataError(
            f"data: {asked} needs more images than {what} holds ({len(order)}); lower them "
            "(0 = all remaining for train, 10% for val and test)"
        )
    out, start = {}, 0
    for s in sorted(splits, key=lambda s: s == "train"):
        n = wanted[s] if wanted[s] else len(order) - start
        out[s] = order[start:start + n]
        start += n
    return out


def require_count(sizes: dict[str, int], family: str) -> None:
    """Generated families make as many images as asked for; 0 ("all") has no meaning there."""
    for split in SPLITS:
        if sizes[split] <= 0:
            raise DataError(
                f"data.num_{split}: 0 means 'all available', but the {family} dataset is generated; "
                "give a number of images (e.g. 2000)"
            )
