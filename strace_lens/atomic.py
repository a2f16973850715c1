"""Writing files so that nothing half-written is ever trusted, and checksums to prove it.

Every writer in strace-lens (results, shards, the fp32 model cache) writes into a temporary
sibling and renames it into place; readers verify SHA-256 checksums recorded at write time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


def read_versioned_json(
    path: Path, fmt: str, version: int, kind: str, corrupted_fix: str, version_label: str
) -> dict[str, Any]:
    """Read a JSON header written by strace-lens and check its format tag and version.

    Raises ValueError naming the file when it is not JSON (``corrupted_fix`` says what to do),
    not of format ``fmt`` (``kind`` names what it should be), or from a newer format version.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is corrupted ({err}){corrupted_fix}") from err
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ValueError(f"{path} is not a strace-lens {kind}.")
    if int(data.get("version", -1)) > version:
        raise ValueError(
            f"{path.parent} was written by a newer strace-lens ({version_label} "
            f"{data['version']}); upgrade strace-lens to read it."
        )
    return data
