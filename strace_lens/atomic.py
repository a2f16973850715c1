"""Writing files so that nothing half-written is ever trusted, and checksums to prove it.

Every writer in strace-lens (results, shards, the fp32 model cache) writes into a temporary
sibling and renames it into place; readers verify SHA-256 checksums recorded at write time.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
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


def _umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: the classic read (briefly sets it)
    os.umask(mask)
    return mask


def normal_mode(path: str | os.PathLike[str]) -> None:
    """Give a file the mode a new file gets (0666 less the umask): writers such as
    safetensors' ``save_file`` create theirs readable by the owner only."""
    os.chmod(path, 0o666 & ~_umask())


def temp_file(folder: str | os.PathLike[str], prefix: str, suffix: str = ".tmp") -> Path:
    """Create an empty file with a fresh random name in ``folder``, with normal permissions.

    Unlike ``tempfile.mkstemp`` (always 0600), the file gets the mode any new file gets
    (0666 less the umask), so results can be shared like other files. Created with
    ``O_EXCL | O_NOFOLLOW``: it never follows a link planted under the chosen name.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(path, flags, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"Could not create a temporary file in {folder}.")


def temp_folder(folder: str | os.PathLike[str], prefix: str, suffix: str = ".tmp") -> Path:
    """Create an empty folder with a fresh random name in ``folder`` (mode 0777 less umask)."""
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"Could not create a temporary folder in {folder}.")


class LinkInFolderError(ValueError):
    """A path the tool would write through is a symbolic link inside the folder the user
    named: refused, so that nothing outside that folder is ever created or replaced."""


def refuse_links(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Raise :class:`LinkInFolderError` if any existing component of ``path`` below ``root``
    (``path`` itself included) is a symbolic link. ``root`` itself, which the user named, may
    be one."""
    root, path = Path(root), Path(path)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise ValueError(f"{path} is not inside {root}.") from None
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise LinkInFolderError(
                f"{current} is a symbolic link: strace-lens never writes through links inside "
                f"{root}. Remove the link (or name another folder) and rerun."
            )


@contextmanager
def written_file(
    path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path`` to write; if the body succeeds it gets the
    normal mode of a new file and is renamed over ``path``. Whatever happens, no temporary is
    left behind.

    The one atomic-write step of strace-lens: a reader sees the old file or the new one, never
    half of one; the temporary is created with ``O_EXCL | O_NOFOLLOW`` (:func:`temp_file`), and
    writers that create their files 0600 (safetensors, ``mkstemp``) still leave a file readable
    like any other. With ``root`` (the folder the user named), links inside it are refused
    first (:func:`refuse_links`).
    """
    path = Path(path)
    if root is not None:
        refuse_links(root, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path.parent, prefix=f".{path.name}.")
    try:
        yield tmp
        normal_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(
    path: str | os.PathLike[str], text: str, root: str | os.PathLike[str] | None = None
) -> Path:
    """Write ``text`` (UTF-8) at ``path`` atomically, with normal permissions
    (:func:`written_file`)."""
    with written_file(path, root) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` at ``path`` atomically, with normal permissions (:func:`written_file`)."""
    with written_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextmanager
def replaced_folder(target: Path, prefix: str) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target``; if the body succeeds it replaces
    ``target`` by a rename, and whatever happens the temporary folder is gone afterwards.

    Its name is ``{prefix}<random>.tmp`` in ``target``'s parent, so leftovers of a killed
    process can be recognised and cleaned.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(target.parent, prefix)
    try:
        yield tmp
        if target.is_symlink():
            target.unlink()  # the link only, never what it points to
        elif target.exists():
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is corrupted ({err}){corrupted_fix}") from err
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ValueError(f"{path} is not a strace-lens {kind}.")
    found = data.get("version", -1)
    if isinstance(found, bool) or not isinstance(found, int):
        raise ValueError(f"{path} is corrupted (its version is {found!r}){corrupted_fix}")
    if found > version:
        raise ValueError(
            f"{path.parent} was written by a newer strace-lens ({version_label} "
            f"{data['version']}); upgrade strace-lens to read it."
        )
    return data


def read_checked_tensors(
    folder: Path, meta_file: str, tensors_file: str, fmt: str, version: int, kind: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON header and the tensors of a result saved as safetensors + JSON with the
    tensors' SHA-256 in the header (``kind``: what the folder should hold, e.g. "TraceResult").

    Raises FileNotFoundError when a file is missing, ValueError when the header is corrupted,
    of another format or a newer version, or the tensors do not match their checksum.
    """
    meta_path, tensors_path = folder / meta_file, folder / tensors_file
    if not meta_path.exists() or not tensors_path.exists():
        raise FileNotFoundError(
            f"{folder} holds no saved {kind} (expected {meta_file} and {tensors_file})."
        )
    meta = read_versioned_json(
        meta_path, fmt, version, kind, "; trace again to rebuild it.", "format"
    )
    if sha256_file(tensors_path) != meta.get("tensors_sha256"):
        raise ValueError(
            f"{tensors_path} does not match its checksum in {meta_file}: the file is "
            "truncated or corrupted. Trace again (a dataset run resumes) to rebuild it."
        )
    from safetensors.torch import load_file  # only where results are read

    return meta, load_file(str(tensors_path))
