"""The prompt sets shipped inside the package: addressed by name, from the API and the CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import DATA

import strace_lens
from strace_lens.cli import main
from strace_lens.prompts import DATA_DIR, PROMPT_SETS, read_prompts, resolve_prompt_source
from strace_lens.result import TraceResult

#: sha256 of the first 600 lines of CorentinKervadec/llm-strace data/wikitext_40.txt
WIKITEXT_SHA256 = "47574949db56f484d55762695cba639ff86540d4c77e13a5a5076a347494830b"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext_40_dev.tsv"


def test_the_names_are_listed_with_a_description():
    sets = strace_lens.prompt_sets()
    assert list(sets) == ["wikitext"]
    assert "CC BY-SA 3.0" in sets["wikitext"]


def test_the_shipped_file_is_the_dev_data_unchanged_with_its_licence_beside_it():
    path = DATA_DIR / PROMPT_SETS["wikitext"][0]
    assert path == DATA
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WIKITEXT_SHA256
    if SHARED.exists():  # the checkout's shared copy, when there is one
        assert SHARED.read_bytes() == path.read_bytes()
    licence = (DATA_DIR / "LICENSE").read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in licence and "Merity" in licence and "llm-strace" in licence
    assert "CC BY-SA 3.0" in (DATA_DIR / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["wikitext", Path("wikitext")])
def test_read_prompts_by_name_reads_the_shipped_tsv(name):
    got = read_prompts(name, n=5)
    assert got.kind == "tsv" and got.path == DATA and got.lines == [1, 2, 3, 4, 5]
    rows = [line.split("\t") for line in DATA.read_text(encoding="utf-8").splitlines()[:5]]
    assert got.prompts == [row[0] for row in rows]
    assert got.targets == [row[5] for row in rows]
    assert len(read_prompts("wikitext")) == 600


def test_an_existing_file_of_the_same_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("wikitext").write_text("my own prompt\n", encoding="utf-8")
    assert resolve_prompt_source("wikitext") == Path("wikitext")
    got = read_prompts("wikitext")
    assert got.prompts == ["my own prompt"] and got.kind == "text"


def test_file_paths_still_work(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a prompt\n", encoding="utf-8")
    assert read_prompts(path).prompts == ["a prompt"]
    assert read_prompts(str(path)).prompts == ["a prompt"]


def test_an_unknown_name_or_path_says_what_exists(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No prompt file at wikitxt.*'wikitext'"):
        read_prompts("wikitxt")
    with pytest.raises(FileNotFoundError, match="No prompt file at"):
        read_prompts(tmp_path / "missing.tsv")


def test_a_missing_data_file_is_reported_as_a_broken_install(tmp_path, monkeypatch):
    monkeypatch.setattr("strace_lens.prompts.DATA_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="without its data files"):
        read_prompts("wikitext")


def test_the_cli_traces_the_shipped_set_by_name(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "trace", "--model", "native:tiny", "--prompts", "wikitext", "--n", "2", "--out",
        str(out), "--sizes", "1", "15", "--option", "steps=2", "--quiet", "--no-html",
    ]  # fmt: skip
    assert main(args) == 0
    result = TraceResult.load(out)
    assert result.n_prompts == 2 and result.target_logprob is not None  # TSV column 6 read
    assert capsys.readouterr().out.startswith("2 prompt(s)")
