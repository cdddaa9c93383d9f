"""The one decoding rule for every image the project reads: the classifier's loader, `make-masked`,
`make-binary-seg`, `predict_masks.py` and the online segmenter's PIL inputs.

    1. EXIF Orientation is applied (`PIL.ImageOps.exif_transpose`): pixels are used upright.
    2. Every mode becomes 8-bit RGB the same way:
       - 16/32-bit grayscale (I;16*, I) keeps its 8 high bits of 16 (v >> 8, as OpenCV reads it);
       - alpha (RGBA, LA, PA, palette transparency) is dropped: the stored colour under a transparent
         pixel is kept, as OpenCV's IMREAD_COLOR and Pillow's convert do;
       - anything else (L, 1, P, CMYK, YCbCr, ...) through Pillow's `convert("RGB")`.
Masks follow rule 1 and become 8-bit single-channel (L) by rule 2's grayscale part.

Files other readers decode (the `make-binary-seg` export that MMSeg's LoadImageFromFile reads through
OpenCV, Pillow or turbojpeg, which disagree on EXIF and CMYK) are written so that every reader gets
these pixels: see `write_upright`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ORIENTATION = 0x0112  # EXIF tag; 5..8 swap width and height
_HIGH_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L", "PA": "RGBA"}


def orientation(img: Image.Image) -> int:
    """The EXIF Orientation of an opened image (1 = upright, also when absent or invalid)."""
    try:
        value = img.getexif().get(ORIENTATION, 1)
    except Exception:  # noqa: BLE001  (a broken EXIF block does not make the pixels unreadable)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image as decoded upright, from the header only (no pixel decoding)."""
    with Image.open(path) as img:
        w, h = img.size
        return (h, w) if orientation(img) in (5, 6, 7, 8) else (w, h)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Grayscale of more than 8 bits -> L (v >> 8); other modes unchanged."""
    if img.mode not in _HIGH_BIT_GRAY:
        return img
    arr = np.asarray(img).astype(np.int64)  # (H, W)
    return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """An in-memory image in any mode -> 8-bit RGB by the module's rule 2 (no orientation change)."""
    img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the palette's colours; the alpha is then dropped below
    if img.mode in _ALPHA:
        img = img.convert(_ALPHA[img.mode])
        if img.mode == "RGBA":
            img = img.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _open_upright(path: str | Path, min_side: int | None = None) -> tuple[Image.Image, bool, tuple[int, int]]:
    """The decoded, upright image, whether it was stored rotated/flipped, and its full upright (w, h).
    With `min_side`, a JPEG is decoded at the smallest of libjpeg's 1/1, 1/2, 1/4, 1/8 scales whose both
    sides stay >= min_side (Pillow's draft mode: the DCT itself is scaled, so decoding costs ~1/k^2)."""
    with Image.open(path) as img:
        turn = orientation(img)  # read once: every dataset item comes through here
        w, h = img.size
        if min_side and img.format == "JPEG":
            img.draft(img.mode, (min_side, min_side))
        img.load()
        full = (h, w) if turn in (5, 6, 7, 8) else (w, h)
        return (ImageOps.exif_transpose(img) if turn != 1 else img.copy()), turn != 1, full


def decode_rgb(path: str | Path) -> Image.Image:
    """The image file as upright 8-bit RGB. Raises Pillow's / the OS's errors for unreadable files."""
    return to_rgb(_open_upright(path)[0])


def decode_rgb_reduced(path: str | Path, min_side: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """`decode_rgb`, but a JPEG at least twice `min_side` on its shorter side comes out reduced by 2, 4 or 8
    (its shorter side still >= min_side), with the full upright (w, h) it has on disk. Masks follow with
    `reduce_mask`. None = full size, as `decode_rgb`."""
    image, _, full = _open_upright(path, min_side)
    return to_rgb(image), full


def reduce_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A full-size mask brought to the (w, h) a reduced JPEG decode gave its image: box-averaged by the same
    integer factor (both round the size up), so its soft edge stays a soft edge for the threshold."""
    if mask.size == size:
        return mask
    factor = round(mask.size[0] / size[0])
    out = mask.reduce(factor) if factor > 1 else mask
    return out if out.size == size else out.resize(size, Image.Resampling.BOX)


def decode_mask(path: str | Path) -> Image.Image:
    """A mask file as upright 8-bit single-channel (L); alpha dropped, palette indices -> colours -> L."""
    img = _to_8bit(_open_upright(path)[0])
    return img if img.mode == "L" else to_rgb(img).convert("L")


def reads_alike(path: str | Path) -> bool:
    """True when every decoder (OpenCV, Pillow, turbojpeg; with or without EXIF handling) gives this
    file's `decode_rgb` pixels: a JPEG in RGB/YCbCr or grayscale, stored upright."""
    with Image.open(path) as img:
        return img.format == "JPEG" and img.mode in ("RGB", "L") and orientation(img) == 1


def write_upright(src: str | Path, image: Image.Image, dst: str | Path) -> None:
    """Write the image of `src` (already decoded by `decode_rgb` as `image`) atomically to `dst` so that
    any decoder reads `image`: the file's own bytes when `reads_alike`, else `image` re-encoded without
    EXIF in the format of `dst`'s suffix (JPEG at quality 95 / 4:4:4, or PNG)."""
    from bgmask.io import atomic_path, atomic_save_image

    if not reads_alike(src):
        atomic_save_image(dst, image)
        return
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
