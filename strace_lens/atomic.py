"""Writing files so that nothing half-written is ever trusted, and checksums to prove it.

Every writer in strace-lens (results, shards, the fp32 model cache) writes into a temporary
sibling and renames it into place; readers verify SHA-256 checksums recorded at write time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def replaced_folder(target: Path, prefix: str) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target``; if the body succeeds it replaces
    ``target`` by a rename, and whatever happens the temporary folder is gone afterwards.

    Its name is ``{prefix}<random>.tmp`` in ``target``'s parent, so leftovers of a killed
    process can be recognised and cleaned.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
