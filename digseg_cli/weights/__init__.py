"""Weights: the named weights digseg knows and the files behind them, one module each:

``registry`` (which entries exist), ``store`` (where they are cached; ``--weights`` name → local folder),
``cache`` (list, verify and remove cache entries), ``hub`` (the Hugging Face Hub and its shared cache),
``download`` (one file over HTTP, resumable and verified) and ``archives`` (safe extraction).
Nothing here builds a model; `digseg_cli.models.loader` does."""
