"""The command line: the only layer that imports Typer and Rich."""
