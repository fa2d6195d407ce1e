from __future__ import annotations

import subprocess
import sys

import pytest

from server.model.cache_files import publish_directory, temporary_for, write_file_atomically


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_writer_that_fails_leaves_the_old_entry_and_no_temporary(tmp_path):
    target = tmp_path / "plan.json"
    write_file_atomically(target, lambda tmp: tmp.write_text("old"))

    def half_then_fail(tmp):
        tmp.write_text("ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file_atomically(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_temporaries_of_dead_writers_go_and_those_of_live_ones_stay(tmp_path):
    target = tmp_path / "entry"
    stale_file, stale_dir = tmp_path / f"entry.tmp{dead_pid()}", tmp_path / f"entry.tmp{dead_pid() + 0}x"
    stale_file.write_text("half")
    stale_dir.mkdir()  # not a pid suffix: not ours to judge
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as live:
        busy = tmp_path / f"entry.tmp{live.pid}"
        busy.mkdir()
        tmp = temporary_for(target)
        live.kill()
    assert not stale_file.exists() and stale_dir.exists() and busy.exists()
    tmp.mkdir()
    (tmp / "tokenizer.json").write_text("{}")
    publish_directory(tmp, target)
    assert (target / "tokenizer.json").read_text() == "{}" and not tmp.exists()


def test_a_directory_published_twice_keeps_the_first(tmp_path):
    target = tmp_path / "entry"
    for text in ("first", "second"):
        tmp = temporary_for(target)
        tmp.mkdir()
        (tmp / "f").write_text(text)
        publish_directory(tmp, target)
    assert (target / "f").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
