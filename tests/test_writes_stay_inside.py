"""Every writer outside the run folder machinery (reproduce's tables and report, the exports)
goes through strace_lens.atomic.write_text / temp_file: atomic, normal permissions, and no
link inside the folder the user named is written through."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest

from strace_lens.atomic import LinkInFolderError, write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_write_text_is_atomic_with_normal_permissions(tmp_path):
    path = write_text(tmp_path / "a" / "b.txt", "hello", root=tmp_path)
    assert path.read_text(encoding="utf-8") == "hello"
    assert _mode(path) == 0o666 & ~_umask()
    write_text(path, "again", root=tmp_path)
    assert path.read_text(encoding="utf-8") == "again"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.txt"]  # no temporaries left


@pytest.mark.parametrize("link", ["tables", "tables/model", "claims.csv"])
def test_write_text_refuses_links_inside_the_root(tmp_path, link):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.csv").write_text("precious", encoding="utf-8")
    root = tmp_path / "out"
    target = root / link
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(outside / "keep.csv" if link.endswith(".csv") else outside)
    dest = root / "claims.csv" if link == "claims.csv" else root / "tables" / "model" / "x.csv"
    if link == "tables":
        dest = root / "tables" / "x.csv"
    with pytest.raises(LinkInFolderError, match="symbolic link"):
        write_text(dest, "new", root=root)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.csv"]
    assert (outside / "keep.csv").read_text(encoding="utf-8") == "precious"


def test_reproduce_refuses_a_linked_runs_folder_before_tracing(tmp_path):
    from strace_lens.reproduce import reproduce

    outside = tmp_path / "outside"
    outside.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two three\nfour five six\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs").symlink_to(outside)
    with pytest.raises(LinkInFolderError, match="runs"):
        reproduce("native:tiny", prompts, n=2, out_dir=out, device="cpu")
    assert list(outside.iterdir()) == []


def test_table_export_replaces_a_link_at_its_path_not_its_target(tmp_path):
    from strace_lens.export.table import save_table

    outside = tmp_path / "outside.csv"
    outside.write_text("precious", encoding="utf-8")
    path = tmp_path / "t.csv"
    path.symlink_to(outside)
    save_table(pd.DataFrame({"a": [1, 2]}), path)
    assert outside.read_text(encoding="utf-8") == "precious"
    assert not path.is_symlink() and path.read_text(encoding="utf-8").startswith("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside.csv", "t.csv"]
