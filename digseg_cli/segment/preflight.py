"""Before a folder run of `digseg segment` segments its first image: its inputs, and the checks that they can run.

One job: the inputs as given or expanded, no two of them writing one file, an output folder that takes files,
an earlier run's manifest of the same run (or a refusal), the run's RLE records, no killed run's temporaries;
`output_paths_of` names an input's output files for the run. Running the images is `run.py`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digseg_cli.segment.inputs import InputFile, expand_inputs, note_geotiffs_as_pictures
from digseg_cli.segment.manifest import RunOrigin, continue_or_refuse, describe, read_previous
from digseg_cli.segment.outputs import check_outputs, output_paths, prepare_out_dir, remove_stale_below
from digseg_cli.segment.rle import RleFile
from digseg_cli.segment.settings import ResolvedRun, SegmentSettings

if TYPE_CHECKING:
    from digseg_cli.inference.pipeline import DigsegPipeline


def _input_files(inputs: Sequence[InputFile | str | Path], out_dir: Path, settings: SegmentSettings) -> list[InputFile]:
    """`InputFile`s as given, or raw paths/globs/`@lists` expanded (the output folder left out)."""
    files = list(inputs)
    if not files or not all(isinstance(f, InputFile) for f in files):
        files = expand_inputs([str(f) for f in files], recursive=settings.recursive, exclude=out_dir)
    return files


def prepare_run(
    inputs: Sequence[InputFile | str | Path],
    out_dir: Path,
    pipe: DigsegPipeline,
    settings: SegmentSettings,
    resolved: ResolvedRun,
    origin: RunOrigin,
) -> tuple[list[InputFile], dict | None, list[dict], RleFile | None]:
    """Before the first image: the inputs once no two write one file, a folder that takes files, the earlier
    run's manifest (`read_previous`) if it is of the same run, its RLE records, no killed run's temporaries."""
    files = _input_files(inputs, out_dir, settings)
    files = check_outputs(files, out_dir, resolved.classes, settings, members=resolved.members)
    prepare_out_dir(out_dir)
    note_geotiffs_as_pictures(files)  # without the geo extra: one line saying how to keep their georeferencing
    previous = read_previous(out_dir)
    earlier = continue_or_refuse(previous, describe(settings, resolved, pipe, origin), out_dir, settings.overwrite)
    rle = RleFile(out_dir, overwrite=settings.overwrite) if settings.rle else None  # the earlier run's records
    remove_stale_below(out_dir, [output_paths_of(out_dir, f, resolved, settings) for f in files])
    return files, previous, earlier, rle


def output_paths_of(out_dir: Path, item: InputFile, resolved: ResolvedRun, settings: SegmentSettings) -> dict[str, Any]:
    return output_paths(out_dir, item, resolved.classes, settings, members=resolved.members)
