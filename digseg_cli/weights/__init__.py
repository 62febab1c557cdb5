"""Weights: the registry of named weights, resolving `--weights` to a local folder, the Hub, downloads and
the local cache (list, verify, remove). Nothing here builds a model; `digseg_cli.models.loader` does."""
