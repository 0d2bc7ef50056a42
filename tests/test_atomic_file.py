"""write_text_atomic: the new content replaces the old in one rename; a write that fails leaves
the old content (and no half-written file under the real name)."""

from __future__ import annotations

import pytest

from ebpo_megatron.atomic_file import write_text_atomic


def test_replaces_the_old_content_and_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "result.json"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path):
    path = tmp_path / "result.json"
    write_text_atomic(path, "old")
    with pytest.raises(TypeError):
        write_text_atomic(path, b"not text")  # fails while writing the temporary file
    assert path.read_text() == "old"
