"""digseg_cli.inference.images: decoding by content, EXIF, odd modes, masks as indices, writers, overlays."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from digseg_cli.errors import UsageError
from digseg_cli.inference.images import (
    ImageReadError,
    default_palette,
    is_image_file,
    parse_color,
    read_image,
    read_mask,
    read_png16,
    write_binary_png,
    write_image,
    write_label_png,
    write_npy,
    write_png16,
)
from digseg_cli.inference.overlay import make_overlay


def _gradient(h: int = 6, w: int = 10) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w)[None, :] * 20
    a[..., 1] = np.arange(h)[:, None] * 30
    a[..., 2] = 77
    return a


def test_rgb_png_round_trip_and_jpeg_named_png(tmp_path):
    a = _gradient()
    write_image(tmp_path / "a.png", a)
    assert np.array_equal(read_image(tmp_path / "a.png"), a)
    # A JPEG stored under a .png name is still read: detection is by content.
    Image.fromarray(a).save(tmp_path / "jpeg.png", format="JPEG", quality=100)
    out = read_image(tmp_path / "jpeg.png")
    assert out.shape == (6, 10, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - a).max() < 20


def test_exif_orientation_is_applied(tmp_path):
    a = _gradient(4, 8)  # 8 wide, 4 tall
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    out = read_image(tmp_path / "rot.jpg")
    assert out.shape == (8, 4, 3)
    expected = np.rot90(a, k=-1)
    assert np.abs(out.astype(int) - expected).mean() < 10


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "1"])
def test_modes_read_as_rgb(tmp_path, mode):
    src = Image.fromarray(_gradient())
    im = src.convert(mode)
    suffix = "jpg" if mode == "CMYK" else "png"
    path = tmp_path / f"x.{suffix}"
    im.save(path)
    out = read_image(path)
    assert out.shape == (6, 10, 3) and out.dtype == np.uint8
    if mode in ("L", "LA"):
        assert np.array_equal(out[..., 0], out[..., 1])
    if mode == "RGBA":
        assert np.array_equal(out, _gradient())  # alpha dropped, colours kept


def test_rgba_transparent_pixels_keep_colour(tmp_path):
    a = np.zeros((2, 2, 4), np.uint8)
    a[..., :3] = 200
    a[..., 3] = 0
    Image.fromarray(a).save(tmp_path / "t.png")
    assert (read_image(tmp_path / "t.png") == 200).all()


def test_16bit_greyscale_scaled_to_8bit(tmp_path):
    a = np.array([[0, 257, 32896, 65535]], np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def test_non_image_raises_image_read_error(tmp_path):
    p = tmp_path / "x.png"
    p.write_text("this is not an image")
    assert not is_image_file(p)
    with pytest.raises(ImageReadError, match="x.png"):
        read_image(p)
    with pytest.raises(ImageReadError):
        read_mask(p)
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    assert issubclass(ImageReadError, UsageError)


def test_truncated_image_raises(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:300])
    assert is_image_file(tmp_path / "cut.png")  # the header is fine ...
    with pytest.raises(ImageReadError, match="cut.png"):  # ... the pixels are not
        read_image(tmp_path / "cut.png")


def test_palette_mask_read_as_indices(tmp_path):
    labels = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
    write_label_png(tmp_path / "m.png", labels)
    assert Image.open(tmp_path / "m.png").mode == "P"
    assert np.array_equal(read_mask(tmp_path / "m.png"), labels)
    # A palette whose colours are unrelated to the indices still reads as indices.
    write_label_png(tmp_path / "m2.png", labels, [(9, 9, 9)] * 6)
    assert np.array_equal(read_mask(tmp_path / "m2.png"), labels)


def test_mask_modes(tmp_path):
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    Image.fromarray(labels).save(tmp_path / "l.png")
    assert np.array_equal(read_mask(tmp_path / "l.png"), labels)
    wide = np.array([[0, 300], [65535, 2]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    assert read_mask(tmp_path / "w.png").tolist() == wide.tolist()
    Image.fromarray(np.repeat(labels[:, :, None], 3, axis=2)).save(tmp_path / "grey_rgb.png")
    assert np.array_equal(read_mask(tmp_path / "grey_rgb.png"), labels)
    Image.fromarray(_gradient()).save(tmp_path / "colour.png")
    with pytest.raises(ImageReadError, match="colour-coded"):
        read_mask(tmp_path / "colour.png")


def test_writers_round_trip(tmp_path):
    probs = np.array([[0.0, 0.25], [0.5, 1.0]])
    write_png16(tmp_path / "p.png", probs)
    back = read_png16(tmp_path / "p.png")
    assert np.abs(back - probs).max() <= 1 / 65535
    assert np.array(Image.open(tmp_path / "p.png")).max() == 65535
    write_binary_png(tmp_path / "b.png", probs > 0.3)
    assert np.array(Image.open(tmp_path / "b.png")).tolist() == [[0, 0], [255, 255]]
    write_npy(tmp_path / "a.npy", probs)
    assert np.array_equal(np.load(tmp_path / "a.npy"), probs)
    write_image(tmp_path / "q.jpg", _gradient(), quality=90)
    assert read_image(tmp_path / "q.jpg").shape == (6, 10, 3)
    with pytest.raises(UsageError):
        write_image(tmp_path / "q.xyz", _gradient())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.png", "p.png", "q.jpg"]  # no temp files


def test_palette_and_colors():
    pal = default_palette(40)
    assert pal[0] == (0, 0, 0) and len(set(pal)) == 40
    assert parse_color("red") == (255, 0, 0)
    assert parse_color("#00ff80") == (0, 255, 128)
    assert parse_color("1, 2, 3") == (1, 2, 3)
    with pytest.raises(UsageError):
        parse_color("not-a-colour")


def test_overlay_blends_classes_and_draws_legend():
    image = np.full((64, 96, 3), 100, np.uint8)
    labels = np.zeros((64, 96), np.int64)
    labels[40:, 60:] = 1
    out = make_overlay(image, labels, [(0, 0, 0), (255, 0, 0), (0, 255, 0)], ["road", "tree"], alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[60, 90].tolist() == [178, 50, 50]  # class 1 blended at alpha 0.5
    assert out[35, 30].tolist() == [100, 100, 100]  # background untouched outside the legend
    assert not np.array_equal(out[:20, :40], image[:20, :40])  # legend drawn top-left
    no_legend = make_overlay(image, labels, None, ["road", "tree"], legend=False)
    assert np.array_equal(no_legend[:20, :40], image[:20, :40])
