"""A data file's identity: what a run folder records about the data it was trained on, and
what caches keyed by a data file (a feature classifier, ...) are keyed by.

The content fingerprint is a SHA-256 of the file's size and bytes. A file up to
:data:`WHOLE_BYTES` is hashed whole; a larger one through :data:`BLOCKS` evenly spaced blocks
of :data:`BLOCK_BYTES` (the first and last included), so a 50 GB file costs a few MiB of reads
while any change of length, header, or a block's bytes still changes it. A rewrite that keeps
the size and touches only bytes between the sampled blocks of a large file goes unseen: the
path, the size and the blocks are what a cheap identity can check.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

#: Files up to this size are hashed whole.
WHOLE_BYTES = 64 * 2**20
#: A larger file is hashed through this many evenly spaced blocks of ``BLOCK_BYTES``.
BLOCKS = 64
BLOCK_BYTES = 64 * 2**10
#: Bytes read per ``read`` when hashing a whole file.
_READ = 2**20


def fingerprint(path: str | Path) -> str:
    """``"sha256:<hex>"`` of ``path``'s size and content (sampled blocks for a large file)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"genkit-data-v1:{size}:".encode())
    with open(path, "rb") as f:
        if size <= WHOLE_BYTES:
            while block := f.read(_READ):
                digest.update(block)
        else:
            last = size - BLOCK_BYTES
            for i in range(BLOCKS):
                f.seek(last * i // (BLOCKS - 1))
                digest.update(f.read(BLOCK_BYTES))
    return f"sha256:{digest.hexdigest()}"


def data_identity(spec: str, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """What identifies the data ``spec`` names (``builtin:NAME`` or a file path): the spec,
    the file read (a built-in's HDF5 cache) and its size and :func:`fingerprint`."""
    from genkit.data.builtin import builtin_path

    if spec.startswith("builtin:"):
        path = builtin_path(spec.removeprefix("builtin:"), cache_dir)
    else:
        path = Path(spec)
    path = Path(os.path.abspath(path))
    return {
        "spec": spec,
        "path": str(path),
        "bytes": path.stat().st_size,
        "fingerprint": fingerprint(path),
    }
