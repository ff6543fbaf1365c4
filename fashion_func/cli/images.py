"""Picture files as Fashion-MNIST images: find PNG/JPEG files, read them safely, and convert
each to a uint8 `[28, 28]` light object on a black background (`prepare_image`: the dataset's
own conversion steps)."""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fashion_func.safeio import FileError, describe, one_line, open_regular

__all__ = ["prepare_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SIZE = 28
# Trim tolerance: pixels within 5% of full scale of the background colour count as background
# (the threshold of step 2 of the Fashion-MNIST conversion, Xiao et al. 2017).
TRIM_TOLERANCE = 0.05 * 255
# 25 megapixels (a 5000x5000 photo, ~100 MB as RGBA while converting); a small PNG can declare
# far more, and decoding it would take gigabytes. PIL refuses above ~179 M pixels in any case.
MAX_IMAGE_PIXELS = 25_000_000


class ImageError(Exception):
    """An image file could not be found or read (one line naming the file)."""


def find_images(paths: Sequence[str], errors: list[str]) -> list[Path]:
    """The image files named, with directories expanded to their PNG/JPEG files (sorted); a path
    that cannot be used (missing, a device, a FIFO, an empty directory) is described in `errors`
    and skipped."""
    found: list[Path] = []
    for text in paths:
        try:
            found.extend(_images_at(Path(text)))
        except ImageError as e:
            errors.append(str(e))
    return found


def _images_at(path: Path) -> list[Path]:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise ImageError(f"{path}: no such file or directory") from None
    if stat.S_ISDIR(mode):
        inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not inside:
            raise ImageError(f"{path}: directory holds no {'/'.join(IMAGE_SUFFIXES)} files")
        return inside
    if not stat.S_ISREG(mode):
        raise ImageError(f"{path}: not a regular file ({describe(mode)})")
    return [path]


def _to_gray(image: Any, background: int) -> np.ndarray:
    """8-bit grayscale as a uint8 array; transparency composited over `background`."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float grayscale: PIL's convert("L") would clip, so scale the full range instead
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" else max(float(arr.max()), 1.0)
        return np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
        image = Image.alpha_composite(canvas, rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8).copy()  # ITU-R 601-2 luma for colour


def prepare_image(image: Any, *, invert: bool = False) -> Tensor:
    """A PIL image as a Fashion-MNIST image: uint8 `[28, 28]`, a light object on a black background.

    The steps follow the dataset's own conversion (Xiao et al. 2017: trim, resize the longest
    edge to 28, extend the shorter edge to 28 with the object centred, negate, 8-bit grayscale):

    1. orientation from EXIF applied; transparency composited over the background colour
       (black, or white with `invert`, so that it ends up black either way);
    2. 8-bit grayscale (ITU-R 601-2 luma for colour; 16-bit images scaled, not clipped);
    3. with `invert`, x -> 255 - x: the dataset holds light garments on black, while product
       photos are usually dark on white (the dataset's pipeline negates for the same reason);
    4. an image that is now 28x28 is returned as it is: it is already in the dataset's frame,
       so a test image saved as PNG comes back bit for bit;
    5. trim: crop to the box of pixels that differ from the background (the median of the four
       corner pixels) by more than 5% of full scale;
    6. pad the shorter side on both sides with the background to a square, so the object is
       centred and keeps its aspect ratio;
    7. resize to 28x28: area averaging (box filter, antialiased) when shrinking, bilinear when
       enlarging (no overshoot, which step 8 would turn into a darker object);
    8. levels: subtract the background and stretch so the brightest pixel is 255, as the
       dataset's images have a 0 background and full-scale highlights.
    """
    from PIL import Image

    gray = _to_gray(image, 255 if invert else 0)
    if invert:
        gray = 255 - gray
    if gray.shape == (SIZE, SIZE):
        return torch.from_numpy(gray)
    corners = gray[[0, 0, -1, -1], [0, -1, 0, -1]].astype(np.float64)
    background = float(np.median(corners))
    rows, cols = np.nonzero(np.abs(gray.astype(np.float64) - background) > TRIM_TOLERANCE)
    if rows.size:  # a blank picture keeps its frame
        gray = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = gray.shape
    side = max(h, w)
    square = np.full((side, side), round(background), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = gray
    resample = Image.Resampling.BOX if side >= SIZE else Image.Resampling.BILINEAR
    small = np.asarray(Image.fromarray(square).resize((SIZE, SIZE), resample), dtype=np.float64)
    small = np.clip(small - background, 0.0, None)
    peak = small.max()
    if peak > 0:
        small = small * (255.0 / peak)
    return torch.from_numpy(np.clip(np.rint(small), 0, 255).astype(np.uint8))


def read_image(path: Path, invert: bool, max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """The image file as a Fashion-MNIST image; ImageError (one line naming it) when it cannot be.
    Only a regular file is opened, and its pixel count is checked from the header before anything
    is decoded: a 164 KB PNG can declare 13000x13000 pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open_regular(path, what="image") as f, warnings.catch_warnings():
            # our own limit is checked below; PIL's warning for large images would be an error under -W error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as image:
                if image.width * image.height > max_pixels:
                    raise ImageError(
                        f"{path}: {image.width}x{image.height} pixels, "
                        f"more than --max-image-pixels {max_pixels}"
                    )
                image.load()
                return prepare_image(image, invert=invert)
    except FileError as e:
        raise ImageError(str(e).removeprefix("image ")) from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too many pixels to decode safely ({one_line(e)})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image PIL can read (PNG or JPEG expected)") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as e:  # truncated or corrupt files
        raise ImageError(f"{path}: cannot read image: {one_line(e)}") from None
