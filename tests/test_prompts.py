"""Reading prompt files: plain text and the 6-column TSV, and a clear error for each mistake."""

from __future__ import annotations

import pytest
from conftest import DATA, dev_rows

from strace_lens.prompts import PromptFileError, read_prompts


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_plain_text_skips_empty_lines_and_keeps_text_exactly(tmp_path):
    path = write(tmp_path, "p.txt", b"first prompt\n\n  second, with spaces \r\n\nthird\n\n")
    got = read_prompts(path)
    assert got.kind == "text"
    assert got.prompts == ["first prompt", "  second, with spaces ", "third"]
    assert got.lines == [1, 3, 5]
    assert got.targets is None


def test_byte_order_mark_is_ignored(tmp_path):
    path = write(tmp_path, "p.txt", "\ufeffÄpfel fallen\n".encode())
    assert read_prompts(path).prompts == ["Äpfel fallen"]


def test_dev_tsv_gives_column_1_as_prompt_and_column_6_as_target():
    got = read_prompts(DATA, n=5)
    rows = dev_rows(5)
    assert got.kind == "tsv"
    assert got.prompts == [r[0] for r in rows]
    assert got.targets == [r[5] for r in rows]
    assert got.targets is not None and got.targets[2] == " his"  # see the data README


def test_n_takes_the_first_prompts_and_reads_no_further(tmp_path):
    path = write(tmp_path, "p.txt", b"a\nb\nc\n\xff broken later\n")
    assert read_prompts(path, n=2).prompts == ["a", "b"]
    with pytest.raises(PromptFileError, match="line 4"):
        read_prompts(path)


def test_non_utf8_names_line_and_byte(tmp_path):
    path = write(tmp_path, "p.txt", b"fine\ncaf\xe9 au lait\n")
    with pytest.raises(PromptFileError) as err:
        read_prompts(path)
    msg = str(err.value)
    assert "not UTF-8" in msg and "line 2" in msg and "byte 4" in msg and "0xe9" in msg


def test_tsv_with_wrong_column_count_names_the_line(tmp_path):
    good = "\t".join(["a prompt", "prompt", "NOUN", "next", "ADJ", " next"])
    bad = "\t".join(["a prompt", "prompt", "NOUN", "next", "ADJ"])
    path = write(tmp_path, "p.tsv", f"{good}\n{good}\n{bad}\n".encode())
    with pytest.raises(PromptFileError) as err:
        read_prompts(path)
    assert "line 3" in str(err.value) and "5 tab-separated" in str(err.value)


def test_tab_in_first_line_means_tsv_even_without_suffix(tmp_path):
    path = write(tmp_path, "p.txt", b"prompt\twith a tab\n")
    with pytest.raises(PromptFileError, match="line 1: 2 tab-separated"):
        read_prompts(path)
    assert read_prompts(path, kind="text").prompts == ["prompt\twith a tab"]


@pytest.mark.parametrize("data", [b"", b"\n\n\r\n"])
def test_empty_file(tmp_path, data):
    with pytest.raises(PromptFileError, match="holds no prompts"):
        read_prompts(write(tmp_path, "p.txt", data))


def test_whitespace_only_prompt_names_the_line(tmp_path):
    with pytest.raises(PromptFileError, match="line 3: the prompt is whitespace only"):
        read_prompts(write(tmp_path, "p.txt", b"one\n\n \t \ntwo\n"))
    row = "\t".join(["   ", "x", "X", "y", "Y", " y"])
    with pytest.raises(PromptFileError, match="line 1: the prompt is whitespace only"):
        read_prompts(write(tmp_path, "p.tsv", row.encode()))


def test_asking_for_more_prompts_than_the_file_holds(tmp_path):
    with pytest.raises(PromptFileError, match=r"holds 2 prompt.*fewer than the 5"):
        read_prompts(write(tmp_path, "p.txt", b"a\nb\n"), n=5)
    with pytest.raises(PromptFileError, match="positive integer"):
        read_prompts(write(tmp_path, "q.txt", b"a\n"), n=0)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "nope.txt")
    with pytest.raises(PromptFileError, match="is a folder"):
        read_prompts(tmp_path)


@pytest.mark.parametrize(
    ("data", "prompts", "lines"),
    [
        (b"one\ntwo\n", ["one", "two"], [1, 2]),  # LF (Unix)
        (b"one\r\ntwo\r\n", ["one", "two"], [1, 2]),  # CRLF (Windows)
        (b"one\rtwo\r", ["one", "two"], [1, 2]),  # CR (classic Mac)
        (b"one\r\ntwo\rthree\nfour", ["one", "two", "three", "four"], [1, 2, 3, 4]),  # mixed
        (b"one\r\r\ntwo", ["one", "two"], [1, 3]),  # an empty line between, CR then CRLF
    ],
)
def test_every_common_line_ending_convention(tmp_path, data, prompts, lines):
    got = read_prompts(write(tmp_path, "p.txt", data))
    assert got.prompts == prompts and got.lines == lines
    assert not any("\r" in p for p in got.prompts)


@pytest.mark.parametrize("blank", ["\u200b", "\ufeff", "\u200b \u200d", "\x00", " \u00a0\t"])
def test_a_prompt_empty_after_normalisation_is_an_error_naming_the_line(tmp_path, blank):
    path = write(tmp_path, "p.txt", f"fine\n{blank}\n".encode())
    with pytest.raises(PromptFileError, match="line 2: the prompt is whitespace only"):
        read_prompts(path)


def test_a_tsv_with_classic_mac_line_endings(tmp_path):
    row = "\t".join(["a prompt", "w", "NOUN", "next", "NOUN", " next"])
    got = read_prompts(write(tmp_path, "p.tsv", f"{row}\r{row}\r".encode()))
    assert got.prompts == ["a prompt", "a prompt"] and got.targets == [" next", " next"]
