"""The per-image noise seed, one policy for every command that runs the pipeline over many images.

An image's noise comes from the run's seed and the image's name (the last part of its relative path), never
from its position, its batch or its shard, so `segment` and `eval` give an image the same result alone, in a
folder, in any order and under any number of processes. Content hashes are not used: a name is what a
user sees, and two copies of one picture under different names are two samples.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath


def image_seed(seed: int, rel: str | PurePosixPath) -> int:
    """The noise seed of one image: sha256 of the run seed and the image's name (its relative path's last
    part), so an image gets the same noise alone, in a folder, in any order or shard."""
    digest = hashlib.sha256(f"{seed}\0{PurePosixPath(rel).name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
