"""Input expansion for `digseg segment`: files, folders, quoted globs and `@list.txt` into `InputFile`s.

One job: find the images a run reads (regular files only: a named pipe met in a folder is skipped with a
warning, one named explicitly is refused; digseg's own outputs in the output folder are never inputs), give
each a relative path that mirrors the input tree and an output stem no other input shares, the
order-independent noise seed of each file, an image's size from its header alone (for `--dry-run` and
`--max-pixels`), and each input read on a worker thread (`read_input`: a picture decoded, a GeoTIFF opened).

It knows nothing of prompts, models or what outputs are written (`outputs.py`; the suffixes it leaves out are
`inference.prompts.OUTPUT_SUFFIXES`), nor of Typer or Rich; decoding pixels is `images.py`'s job, reading
GeoTIFFs `rasters.py`'s.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from digseg_cli.errors import NoInputsError, UsageError
from digseg_cli.files import not_regular_reason, require_regular_file
from digseg_cli.inference import images
from digseg_cli.inference.prompts import OUTPUT_SUFFIXES
from digseg_cli.inference.seeds import image_seed  # noqa: F401 - re-exported: the seed policy lives in inference
from digseg_cli.segment import rasters

if TYPE_CHECKING:
    from digseg_cli.segment.settings import SegmentSettings

log = logging.getLogger("digseg")


@dataclass(frozen=True)
class InputFile:
    """One input: its path and the relative path mirrored under the output folder."""

    path: Path
    rel: PurePosixPath
    keep_suffix: bool = False  # a sibling shares the stem (img.jpg, img.png): outputs are img.jpg.mask.png

    @property
    def key(self) -> PurePosixPath:
        """Output stem: the relative path without its suffix (`a/b/img.jpg` → `a/b/img`)."""
        return self.rel if self.keep_suffix else self.rel.with_suffix("")


def _looks_like_image(path: Path) -> bool:
    return path.suffix.lower() in images_suffixes() or images.is_image_file(path)


def images_suffixes() -> set[str]:
    from PIL import Image

    return {s.lower() for s in Image.registered_extensions()}


def _is_own_output(path: Path, out_dir: Path | None) -> bool:
    """A mask, overlay or probability map digseg wrote in the output folder: never an input of a rerun."""
    return out_dir is not None and out_dir in path.parents and path.name.endswith(OUTPUT_SUFFIXES)


def _candidates(paths: Sequence[Path], out_dir: Path | None) -> list[Path]:
    """The images among files met while listing: digseg's own outputs left out, and anything but a regular
    file (a named pipe would block the read forever) skipped with a warning."""
    keep = []
    for path in paths:
        if _is_own_output(path, out_dir):
            continue
        if (reason := not_regular_reason(path)) is not None:
            log.warning("skipping %s: it %s; digseg reads only regular files", path, reason)
            continue
        if _looks_like_image(path):
            keep.append(path)
    return keep


def _walk(folder: Path, recursive: bool, exclude: Path | None) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (exclude is None or here / d != exclude))
        found += [here / f for f in sorted(filenames) if not f.startswith(".")]
        if not recursive:
            if dirnames:
                log.debug("%s has %d sub-folders; pass --recursive to include them", folder, len(dirnames))
            break
    return _candidates(found, exclude)


def _distinct_keys(items: list[InputFile]) -> list[InputFile]:
    """Give inputs that share an output stem their suffix (img.jpg, img.png → img.jpg.*, img.png.*), again
    until no stem is shared: a.png, a.jpg and a.png.png end as a.png.*, a.jpg.* and a.png.png.* (relative
    paths are unique, so this always ends; `outputs.check_outputs` checks the final file names)."""
    while True:
        counts = Counter(item.key for item in items)
        shared = [i for i, item in enumerate(items) if counts[item.key] > 1 and not item.keep_suffix]
        if not shared:
            return items
        for i in shared:
            items[i] = dataclasses.replace(items[i], keep_suffix=True)


def expand_inputs(
    inputs: Sequence[str | Path], *, recursive: bool = False, exclude: str | Path | None = None
) -> list[InputFile]:
    """Files, folders, quoted globs and `@list.txt` files → `InputFile`s, de-duplicated, in the given order.

    Files inside folders and glob matches count when their content or suffix says image (a broken `x.png`
    is an input that then fails; `notes.txt` is ignored); an explicitly named file always counts. Relative
    paths are taken from the deepest folder common to all inputs, so the output tree mirrors the input
    tree and same-named files from different folders never collide. `exclude` (the output folder) is
    never walked. A named file that does not exist stays in the list (it fails when read, so the run
    reports it); `NoInputsError` when no existing image is found at all.
    """
    exclude = Path(os.path.abspath(exclude)) if exclude is not None else None
    found: list[tuple[Path, Path]] = []  # (file, root it was found under)

    def collect(text: str, base: Path, from_list: bool) -> None:
        if text.startswith("@") and not from_list:
            listing = Path(text[1:]).expanduser()
            try:
                lines = listing.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise UsageError(f"cannot read input list {listing}: {exc.strerror or exc}") from None
            for line in (s.strip() for s in lines):
                if line and not line.startswith("#"):
                    collect(line, Path(os.path.abspath(listing)).parent, True)
            return
        path = Path(os.path.abspath(base / Path(text).expanduser()))
        if path.is_dir():
            found.extend((p, path) for p in _walk(path, recursive, exclude))
        elif path.exists():
            found.append((require_regular_file(path, "input"), path.parent))
        elif glob.has_magic(text):
            root = Path(os.path.abspath(base / Path(text).expanduser()))
            while glob.has_magic(str(root)):
                root = root.parent
            matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
            inside_out = exclude is not None and exclude != root  # an output folder below the glob's root
            files = _candidates(
                [m for m in matches if not m.is_dir() and not (inside_out and exclude in m.parents)], exclude
            )
            for m in (m for m in matches if m.is_dir()):
                files += _walk(m, recursive, exclude)
            if not files:
                log.warning("no images match %s", text)
            found.extend((f, root) for f in files)
        else:
            found.append((path, path.parent))  # fails when read: "no such file"

    for item in inputs:
        collect(str(item), Path.cwd(), False)
    seen: set[Path] = set()
    unique = [(f, r) for f, r in found if not (f in seen or seen.add(f))]  # first occurrence wins
    if not any(f.exists() for f, _ in unique):
        tried = ", ".join(str(i) for i in inputs) or "(none)"
        absent = [str(f) for f, _ in unique]
        hint = (
            f": {', '.join(absent)} do(es) not exist"
            if absent
            else ""
            if recursive
            else " (sub-folders are searched only with --recursive)"
        )
        raise NoInputsError(f"no images found in {tried}{hint}")
    common = Path(os.path.commonpath([str(r) for _, r in unique]))
    return _distinct_keys([InputFile(f, PurePosixPath(f.relative_to(common).as_posix())) for f, _ in unique])


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, EXIF rotation applied, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    images.require_image_file(path)  # a named pipe would block Image.open forever
    if rasters.reads_as_raster(path):
        return rasters.raster_size(path)
    try:
        with Image.open(path) as im:
            (w, h), orientation = im.size, im.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise images.ImageReadError(path, "no such file") from None
    except UnidentifiedImageError:
        raise images.ImageReadError(path, "not an image file (unknown format)") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types; read_image gives the precise reason
        raise images.ImageReadError(path, f"cannot read the header ({type(exc).__name__})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_input(path: Path, settings: SegmentSettings) -> tuple[np.ndarray | rasters.RasterInfo, float]:
    """One input (worker thread) and the seconds it took: a picture decoded to `[H,W,3]` uint8 (refused before
    decoding when it is over `--max-pixels`), or a GeoTIFF opened (`rasters.open_raster`; its pixels are read block
    by block, so only one read whole, with `--tile off`, is held to `--max-pixels`)."""
    t0 = time.perf_counter()
    max_pixels = settings.max_pixels

    def check(w: int, h: int) -> None:
        if max_pixels and w * h > max_pixels:
            raise images.ImageReadError(
                path,
                f"{w}x{h} is {w * h / 1e6:.1f} MP, over --max-pixels {max_pixels / 1e6:g}"
                " MP: downscale it or raise --max-pixels (0 = no limit)",
            )

    if rasters.reads_as_raster(path):
        info = rasters.open_raster(path, settings.bands)
        if settings.tile == "off":
            check(info.width, info.height)
        return info, time.perf_counter() - t0
    try:
        size = header_size(path)  # refuse before decoding
    except Exception:  # noqa: BLE001 - read_image below names the problem precisely
        size = None
    if size is not None:
        check(*size)
    array = images.read_image(path)  # [H,W,3] uint8, EXIF orientation applied
    check(array.shape[1], array.shape[0])
    return array, time.perf_counter() - t0


def note_geotiffs_as_pictures(files: Sequence[InputFile]) -> None:
    """The one line a run logs when GeoTIFF inputs are read as pictures (no `geo` extra): georeferencing dropped."""
    if rasters.geo_available() or not (found := sum(1 for f in files if rasters.is_geotiff(f.path))):
        return
    log.warning(
        "%d GeoTIFF input(s) segmented as pictures: their georeferencing (CRS, transform, nodata) is dropped and "
        "their outputs are PNGs; to keep it, %s",
        found,
        rasters.GEO_EXTRA,
    )
