"""Image files in and out: decoding photos and masks, writing label maps and probabilities (overlays: `overlay`).

Every pixel that enters or leaves digseg through a file passes through here, so decoding rules live in
one place:

- ``read_image`` detects the type by content (never by extension), applies the EXIF orientation and
  returns ``HxWx3`` uint8 RGB. Greyscale is repeated over three channels; palette images are expanded
  to their colours; CMYK/YCbCr/LAB are converted by Pillow; 16-bit greyscale (``I;16``) is scaled
  linearly to 8 bits (``v / 257``); 32-bit ``I`` and float ``F`` images are scaled by their value range.
  **Alpha is dropped**, not composited: the colours stored under transparent pixels are kept as they
  are, because the model segments what was photographed (transparent no-data areas are usually black).
  Multi-frame files (GIF, TIFF) give their first frame.
- ``read_mask`` returns ``HxW`` integer class indices. Palette PNGs are read as indices, never as
  colours; ``L``/``I;16``/``I`` as stored; RGB masks whose three channels are equal as one channel.
- Writers are atomic, durable and follow the umask: they write through ``digseg_cli.files.atomic_path``.

It deliberately knows nothing of models, prompts, tensors, folder layouts or file naming schemes:
callers decide which file to write; this module only decides how.
"""

from __future__ import annotations

import colorsys
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from digseg_cli.errors import UsageError
from digseg_cli.files import atomic_path, atomic_write_bytes, is_regular_file, not_regular_reason

PathLike = str | os.PathLike[str]
RGB = tuple[int, int, int]

# Hand-picked, mutually distinct colours for the first classes (index 0 = background = black).
_BASE_COLORS: tuple[RGB, ...] = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)


class ImageReadError(UsageError):
    """A file could not be decoded as an image or mask; the message names the file and the reason."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {path}: {reason}")


# --------------------------------------------------------------------------------------------------
# Reading


def require_image_file(path: PathLike) -> Path:
    """``path`` when it is a regular file, else ``ImageReadError`` saying what it is (a named pipe would block
    a read forever)."""
    if (reason := not_regular_reason(path)) is not None:
        raise ImageReadError(path, "no such file" if reason == "does not exist" else reason)
    return Path(path)


def _open(path: PathLike) -> Image.Image:
    """Decode ``path`` (first frame, EXIF orientation applied), mapping every failure to ``ImageReadError``."""
    p = require_image_file(path)
    try:
        data = p.read_bytes()  # decoded from memory: no file handle is left open (GIF, TIFF)
    except OSError as exc:
        raise ImageReadError(path, exc.strerror or str(exc)) from None
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        im = ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file (unknown format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(path, f"corrupt or truncated ({exc})") from None
    return im


def is_image_file(path: PathLike) -> bool:
    """True when Pillow recognises the content of ``path`` as an image (header sniff, no decoding); False for
    anything but a regular file."""
    if not is_regular_file(path):
        return False
    try:
        with Image.open(path) as im:
            return im.format is not None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return False


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Map a wide integer or float single-band array to uint8 (see the module docstring)."""
    if mode.startswith("I;16"):
        return np.round(a.astype(np.float32) / 257.0).astype(np.uint8)
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = a
    elif lo >= 0.0 and hi <= 65535.0:
        scaled = a / 257.0
    else:
        scaled = (a - lo) / max(hi - lo, 1e-12) * 255.0
    scaled = np.where(finite, scaled, 0.0)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """Convert a decoded Pillow image of any mode to ``HxWx3`` uint8 RGB (alpha dropped)."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = _scale_to_uint8(np.asarray(im), mode)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.asarray(im.convert("RGBA"), dtype=np.uint8)[:, :, :3].copy()
    if mode in ("L", "LA", "La", "1"):
        grey = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("P", "PA"):
        return np.asarray(im.convert("RGBA"), dtype=np.uint8)[:, :, :3].copy()
    # CMYK, YCbCr, LAB, HSV and anything else Pillow knows how to convert.
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_image(path: PathLike) -> np.ndarray:
    """Read any image file as ``HxWx3`` uint8 RGB, EXIF orientation applied; see the module docstring."""
    im = _open(path)
    try:
        return to_rgb_array(im)
    except (OSError, ValueError) as exc:
        raise ImageReadError(path, f"cannot convert {im.mode} image to RGB ({exc})") from None


def read_mask(path: PathLike) -> np.ndarray:
    """Read a class-index mask as ``HxW`` integers (uint8 for 8-bit files, int32 for wider ones).

    Palette images give their indices; RGB(A) masks are accepted only when R == G == B everywhere
    (otherwise they are colour-coded and need a colour table, which raises ``ImageReadError``).
    """
    im = _open(path)
    mode = im.mode
    if mode in ("P", "L"):
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("PA", "LA", "La"):
        return np.asarray(im, dtype=np.uint8)[:, :, 0].copy()
    if mode == "1":
        return np.asarray(im, dtype=np.uint8).copy()  # bool → 0/1
    if mode.startswith("I"):
        return np.asarray(im).astype(np.int32)
    if mode == "F":
        a = np.asarray(im)
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise ImageReadError(path, "float mask with non-integer values; save masks as integer PNGs")
        return a.astype(np.int32)
    if mode in ("RGB", "RGBA", "RGBX"):
        a = np.asarray(im, dtype=np.uint8)[:, :, :3]
        if np.array_equal(a[:, :, 0], a[:, :, 1]) and np.array_equal(a[:, :, 0], a[:, :, 2]):
            return a[:, :, 0].copy()
        raise ImageReadError(
            path, "colour-coded RGB mask; save masks as single-channel class-index PNGs (or palette PNGs)"
        )
    raise ImageReadError(path, f"unsupported mask mode {mode}; save masks as single-channel PNGs")


# --------------------------------------------------------------------------------------------------
# Colours


def default_palette(n: int) -> list[RGB]:
    """``n`` distinct RGB colours; index 0 is black (background). Deterministic."""
    colors = list(_BASE_COLORS[:n])
    golden = 0.618033988749895
    i = 0
    while len(colors) < n:
        hue = (0.11 + i * golden) % 1.0
        sat = 0.55 + 0.4 * ((i * 7) % 3) / 2
        val = 0.95 - 0.35 * ((i * 5) % 2)
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
        i += 1
    return colors


def parse_color(value: str | Sequence[int]) -> RGB:
    """A colour name (``"orange"``), ``#rrggbb``/``#rgb``, ``rgb(…)`` or ``"r,g,b"`` → (r, g, b)."""
    if not isinstance(value, str):
        # From a settings file a colour can be anything (`color: 5`, `[1.5, "a"]`): one message for all.
        ints = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ints or len(value) != 3 or any(v < 0 or v > 255 for v in value):
            raise UsageError(f"colour {value!r:.60} must be a name, '#rrggbb' or three integers in 0..255")
        return (int(value[0]), int(value[1]), int(value[2]))
    text = value.strip()
    if "," in text and not text.lower().startswith(("rgb", "hsl", "hsv")):
        try:
            return parse_color([int(v) for v in text.split(",")])
        except ValueError:
            pass
    try:
        rgb = ImageColor.getrgb(text)
    except ValueError:
        raise UsageError(f"unknown colour {value!r}; use a name like 'orange', '#ff8800' or '255,136,0'") from None
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def colorize_labels(labels: np.ndarray, palette: Sequence[RGB]) -> np.ndarray:
    """``HxW`` label map → ``HxWx3`` uint8 colours; values beyond the palette are drawn white."""
    lut = np.full((max(int(labels.max(initial=0)) + 1, len(palette)), 3), 255, np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    return lut[np.clip(labels, 0, None).astype(np.int64)]


def _full_palette(palette: Sequence[RGB] | None) -> list[int]:
    colors = list(palette) if palette is not None else []
    colors += default_palette(256)[len(colors) :]
    return [c for rgb in colors[:256] for c in rgb]


# --------------------------------------------------------------------------------------------------
# Writing


def _save_pil(path: PathLike, im: Image.Image, *, overwrite: bool = True, **params: object) -> Path:
    fmt = _format_for(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        im.save(tmp, format=fmt, **params)
    return Path(path)


def _format_for(path: PathLike) -> str:
    suffix = Path(path).suffix.lower()
    formats = {
        ".png": "PNG",
        ".jpg": "JPEG",
        ".jpeg": "JPEG",
        ".webp": "WEBP",
        ".tif": "TIFF",
        ".tiff": "TIFF",
        ".bmp": "BMP",
    }
    if suffix not in formats:
        raise UsageError(f"cannot write {path}: unknown image suffix {suffix!r}; use .png, .jpg, .webp or .tif")
    return formats[suffix]


def write_label_png(
    path: PathLike, labels: np.ndarray, palette: Sequence[RGB] | None = None, *, overwrite: bool = True
) -> Path:
    """Write an ``HxW`` class-index map (0..255) as a palette PNG; 0 is black unless ``palette`` says."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"`labels` must be HxW, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("`labels` must be in 0..255 for a palette PNG")
    im = Image.fromarray(labels.astype(np.uint8))
    im.putpalette(_full_palette(palette))
    return _save_pil(path, im, overwrite=overwrite, optimize=False)


def write_png16(path: PathLike, probs: np.ndarray, *, overwrite: bool = True) -> Path:
    """Write ``HxW`` probabilities in [0, 1] as a 16-bit greyscale PNG: pixel / 65535 = probability."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"`probs` must be HxW, got shape {probs.shape}")
    return _save_pil(path, Image.fromarray(quantize_probs(probs)), overwrite=overwrite)


def quantize_probs(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] → uint16, probability = value / 65535 (16-bit PNGs and GeoTIFFs alike)."""
    return np.round(np.clip(np.nan_to_num(np.asarray(probs, dtype=np.float64)), 0.0, 1.0) * 65535.0).astype(np.uint16)


def read_png16(path: PathLike) -> np.ndarray:
    """Inverse of ``write_png16``: ``HxW`` float32 probabilities in [0, 1]."""
    im = _open(path)
    if not im.mode.startswith("I"):
        raise ImageReadError(path, f"expected a 16-bit probability PNG, got mode {im.mode}")
    return (np.asarray(im).astype(np.float32) / 65535.0).astype(np.float32)


def write_binary_png(path: PathLike, mask: np.ndarray, *, overwrite: bool = True) -> Path:
    """Write an ``HxW`` boolean mask as an 8-bit PNG with values 0 and 255."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be HxW, got shape {mask.shape}")
    return _save_pil(path, Image.fromarray(np.where(mask.astype(bool), 255, 0).astype(np.uint8)), overwrite=overwrite)


def write_npy(path: PathLike, array: np.ndarray, *, overwrite: bool = True) -> Path:
    """Save ``array`` with ``np.save`` (no pickling) atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue(), overwrite=overwrite)


def write_image(path: PathLike, array: np.ndarray, quality: int = 95, *, overwrite: bool = True) -> Path:
    """Write ``HxW``/``HxWx3``/``HxWx4`` uint8 pixels; the format follows the suffix (JPEG uses ``quality``)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"`array` must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"`array` must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    fmt = _format_for(path)
    im = Image.fromarray(array)
    params: dict[str, object] = {}
    if fmt in ("JPEG", "WEBP"):
        params["quality"] = int(quality)
    if fmt == "JPEG" and im.mode == "RGBA":
        im = im.convert("RGB")
    return _save_pil(path, im, overwrite=overwrite, **params)
