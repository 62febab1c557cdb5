"""The package version, in one place (pyproject reads it; nothing imports the package `__init__` for it)."""

__version__ = "0.1.0"
