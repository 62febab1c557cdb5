"""`digseg segment` as a library, one module per step: `settings` (what a run is asked to do and what that
comes to for one model), `inputs` (files, folders, globs and lists in), `loading` (device, precision and
weights), `run` (the folder run), `outputs` (files, records and the manifest out) and `plan` (`--dry-run`)."""
