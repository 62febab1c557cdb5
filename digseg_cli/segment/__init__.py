"""`digseg segment` as a library, one module per step: `settings` (what a run is asked to do and what that
comes to for one model), `inputs` (files, folders, globs and lists in), `loading` (device, precision and
weights), `run` (the folder run), `backoff` (out-of-memory), `outputs` (the files of each image, checked
before they are written), `manifest` (`run.json`, and whether a rerun continues it) and `plan` (`--dry-run`)."""
