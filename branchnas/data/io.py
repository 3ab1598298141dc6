"""Reading sample files from disk, turning every failure into a :class:`DataError` naming the sample.

PIL is imported only when an image is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from branchnas.errors import DataError

__all__ = ["read_image", "read_npy"]


def read_image(path: Path, where: str, mode: str | None = "RGB") -> np.ndarray:
    """Decode an image file into ``(H, W, C)`` (uint8 for 8-bit files).

    Args:
        path: the file.
        where: how to name the sample in an error.
        mode: PIL mode to convert to (``"RGB"``, ``"L"``), or ``None`` to keep the file's
            own values (label maps, 16-bit disparity).

    Raises:
        DataError: the file is missing or cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if mode is not None and img.mode != mode:
                img = img.convert(mode)
            array = np.array(img)
    except FileNotFoundError:
        raise DataError(f"{where}: file {path} is missing") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{where}: cannot read image {path}: {err}") from None
    return array[:, :, None] if array.ndim == 2 and mode is not None else array


def read_npy(path: Path, where: str) -> np.ndarray:
    """Load a ``.npy`` array (no pickles), turning I/O errors into :class:`DataError`."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{where}: file {path} is missing") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: cannot read {path}: {err}") from None
