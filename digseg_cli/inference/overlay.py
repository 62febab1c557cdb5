"""Overlays: class colours blended over an image, with a legend of the class names.

Pixels only: the caller reads the image, decides the palette (`images.default_palette` when none) and writes the
result (`images.write_image`). Used by `digseg segment`'s overlay and by the eval report's worst images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from digseg_cli.inference.images import RGB, colorize_labels, default_palette


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def make_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    palette: Sequence[RGB] | None,
    class_names: Sequence[str],
    alpha: float = 0.5,
    *,
    legend: bool = True,
) -> np.ndarray:
    """Blend class colours over ``image`` and draw a legend of all ``class_names``; returns ``HxWx3`` uint8.

    ``labels`` is ``HxW`` with 0 = background (left unchanged) and ``k`` = ``class_names[k-1]``;
    ``palette[k]`` is its colour (``default_palette`` when ``None``). Values outside 1..K are not drawn.
    The legend (swatch + name per class, in prompt order) sits in the top-left corner on a dark box.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3].astype(np.uint8)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"`labels` shape {labels.shape} does not match image {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("`alpha` must be in [0, 1]")
    k = len(class_names)
    colors = list(palette) if palette is not None else default_palette(k + 1)
    if len(colors) < k + 1:
        colors += default_palette(k + 1)[len(colors) :]
    colors = colors[: k + 1]

    drawn = (labels > 0) & (labels <= k)
    color_img = colorize_labels(np.where(drawn, labels, 0), colors).astype(np.float32)
    blend = image.astype(np.float32) * (1.0 - alpha) + color_img * alpha
    out = np.where(drawn[:, :, None], np.round(blend), image).astype(np.uint8)
    if not legend or k == 0:
        return out

    h, w = out.shape[:2]
    size = int(np.clip(min(h, w) // 32, 10, 32))
    font = _font(size)
    pil = Image.fromarray(out).convert("RGBA")
    layer = Image.new("RGBA", pil.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    pad, gap = max(2, size // 4), max(2, size // 5)
    row = size + gap
    text_w = max(int(draw.textlength(name, font=font)) for name in class_names)
    box_w = pad * 3 + size + text_w
    box_h = pad * 2 + row * k - gap
    draw.rectangle([0, 0, min(box_w, w - 1), min(box_h, h - 1)], fill=(0, 0, 0, 150))
    for i, name in enumerate(class_names):
        y = pad + i * row
        draw.rectangle([pad, y, pad + size - 1, y + size - 1], fill=(*colors[i + 1], 255), outline=(255, 255, 255, 255))
        if isinstance(font, ImageFont.FreeTypeFont):
            draw.text((pad * 2 + size, y + size // 2), name, fill=(255, 255, 255, 255), font=font, anchor="lm")
        else:
            draw.text((pad * 2 + size, y), name, fill=(255, 255, 255, 255), font=font)
    return np.asarray(Image.alpha_composite(pil, layer).convert("RGB"), dtype=np.uint8).copy()
