"""Reading prompt files: plain text (one prompt a line) or the 6-column TSV of the dev data.

Format rules, chosen so that a mistake in the file is reported rather than traced:

- The file must be UTF-8 (a leading byte-order mark is ignored). Any other byte sequence is
  an error that names the line and the byte offset of the first undecodable byte.
- Line endings may be LF (Unix), CRLF (Windows) or CR (old Mac), even mixed in one file;
  the line ending is not part of the prompt.
- **Empty lines are skipped** (they separate prompts, or end the file). A line holding only
  spaces or tabs is **not** skipped: it is an error naming the line, because a prompt made of
  whitespace has nothing to predict from and usually means the file was mangled. So is a
  line of only invisible characters (a zero-width space, a stray byte-order mark).
- Otherwise a plain-text line is one prompt, kept exactly as written (leading and trailing
  spaces included: they change the tokens).
- TSV (a ``.tsv`` file, or any file whose first non-empty line holds a tab): every non-empty
  line must have exactly 6 tab-separated columns (see ``strace_lens/data/README.md``). Column 1 is
  the prompt; column 6, the true next token as the model sees it (e.g. ``" his"``), is
  returned as the prompt's target so a trace can record the full model's log-prob of it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from strace_lens.validate import is_blank

#: Number of tab-separated columns in a prompt TSV (prompt, last word, POS, next word, POS,
#: next token).
TSV_COLUMNS = 6
PROMPT_COLUMN = 0
TARGET_COLUMN = 5

FileKind = Literal["text", "tsv"]


class PromptFileError(ValueError):
    """A prompt file that cannot be read as prompts; the message names the line."""


@dataclass(frozen=True)
class PromptFile:
    """The prompts of a file, in file order, with their targets (TSV only) and line numbers."""

    path: Path
    kind: FileKind
    prompts: list[str]
    #: the true next token of each prompt (TSV column 6), or None for plain text
    targets: list[str] | None
    #: 1-based line number of each prompt in the file
    lines: list[int]

    def __len__(self) -> int:
        return len(self.prompts)


def _detect_kind(path: Path, first_line: str) -> FileKind:
    if path.suffix.lower() == ".tsv" or "\t" in first_line:
        return "tsv"
    return "text"


def _decode_line(raw: bytes, number: int, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.start + 1]
        raise PromptFileError(
            f"{path} is not UTF-8: line {number}, byte {err.start + 1} of that line "
            f"(0x{bad.hex()}) cannot be decoded. Re-save the file as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`)."
        ) from None


def read_prompts(
    path: str | os.PathLike[str], n: int | None = None, kind: FileKind | None = None
) -> PromptFile:
    """Read the first ``n`` prompts (all when ``n`` is None) of a prompt file.

    Args:
        path: a plain-text file (one prompt a line) or a 6-column TSV (see module docstring),
            or the name of a prompt set shipped with the package (see :func:`prompt_sets`).
        n: how many prompts to take from the top of the file; the file must hold that many.
            Lines after the n-th prompt are not read (nor checked).
        kind: ``"text"`` or ``"tsv"`` to override the detection (by ``.tsv`` suffix, or a tab
            in the first non-empty line).

    Raises:
        FileNotFoundError: no such file.
        PromptFileError: non-UTF-8 bytes, a whitespace-only prompt, a TSV line without
            exactly 6 columns, an empty file, or fewer than ``n`` prompts; each message names
            the line.
    """
    path = Path(path)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise PromptFileError(f"The number of prompts must be a positive integer, got {n!r}.")
    if kind not in (None, "text", "tsv"):
        raise PromptFileError(f"Unknown prompt file kind {kind!r}: use 'text' or 'tsv'.")
    path = resolve_prompt_source(path)  # the path itself, or a shipped prompt set's file
    if path.is_dir():
        raise PromptFileError(f"{path} is a folder, not a prompt file.")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    prompts: list[str] = []
    targets: list[str] = []
    lines: list[int] = []
    for number, raw in enumerate(re.split(rb"\r\n|\r|\n", data), start=1):
        if n is not None and len(prompts) >= n:
            break
        line = _decode_line(raw, number, path)
        if line == "":
            continue
        if kind is None:
            kind = _detect_kind(path, line)
        if kind == "tsv":
            columns = line.split("\t")
            if len(columns) != TSV_COLUMNS:
                raise PromptFileError(
                    f"{path}, line {number}: {len(columns)} tab-separated column(s), but a "
                    f"prompt TSV has exactly {TSV_COLUMNS} (prompt, last word, POS, next word, "
                    "POS, next token). Fix that line, or pass a plain-text file with one "
                    "prompt a line."
                )
            prompt, target = columns[PROMPT_COLUMN], columns[TARGET_COLUMN]
            if target == "":
                raise PromptFileError(
                    f"{path}, line {number}: column {TARGET_COLUMN + 1} (the next token) is empty."
                )
        else:
            prompt, target = line, ""
        if is_blank(prompt):
            raise PromptFileError(
                f"{path}, line {number}: the prompt is whitespace only (or invisible "
                f"characters: {prompt!r}). Remove the line or give it some text (empty lines "
                "are skipped, whitespace-only ones are not)."
            )
        prompts.append(prompt)
        targets.append(target)
        lines.append(number)
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts (it is empty or only empty lines).")
    if n is not None and len(prompts) < n:
        raise PromptFileError(
            f"{path} holds {len(prompts)} prompt(s), fewer than the {n} asked for: ask for at "
            f"most {len(prompts)}."
        )
    assert kind is not None
    return PromptFile(
        path=path,
        kind=kind,
        prompts=prompts,
        targets=targets if kind == "tsv" else None,
        lines=lines,
    )


# --- Prompt sets shipped inside the package (strace_lens/data/) --------------------------------

#: name -> (file in strace_lens/data/, one-line description); data/README.md gives each file's
#: columns, source and licence.
PROMPT_SETS: dict[str, tuple[str, str]] = {
    "wikitext": (
        "wikitext_40_dev.tsv",
        "600 WikiText-103 passage prefixes with their next token (6-column TSV; CC BY-SA 3.0, "
        "Merity et al. 2016, as prepared in CorentinKervadec/llm-strace)",
    ),
}
DATA_DIR = Path(__file__).resolve().parent / "data"


def prompt_sets() -> dict[str, str]:
    """The prompt sets shipped with the package: name -> description.

    Pass a name wherever a prompt file is asked for: ``read_prompts("wikitext")``,
    ``strace-lens trace --prompts wikitext``.
    """
    return {name: description for name, (_, description) in PROMPT_SETS.items()}


def resolve_prompt_source(source: str | os.PathLike[str]) -> Path:
    """The file that ``source`` names: an existing path as given, else a shipped set's file.

    An existing file or folder always wins, so a file that happens to be called ``wikitext``
    in the working directory is read as that file.

    Raises:
        FileNotFoundError: neither an existing path nor a set name (the message lists the
            names), or a set whose file the installation lacks.
    """
    path = Path(source)
    if path.exists():
        return path
    entry = PROMPT_SETS.get(str(source))
    if entry is not None:
        packaged = DATA_DIR / entry[0]
        if not packaged.is_file():
            raise FileNotFoundError(
                f"The prompt set {str(source)!r} should be at {packaged}, which is missing: "
                "the package was installed without its data files. Reinstall strace-lens."
            )
        return packaged
    names = ", ".join(repr(name) for name in PROMPT_SETS)
    raise FileNotFoundError(f"No prompt file at {path}, nor a prompt set of that name ({names}).")


__all__ = [
    "PROMPT_SETS",
    "PromptFile",
    "PromptFileError",
    "prompt_sets",
    "read_prompts",
    "resolve_prompt_source",
]
