"""Files that must survive a crash (fedcycle.files.atomic_write): written whole or not at all."""

from __future__ import annotations

import pytest

from fedcycle.files import atomic_write


def test_a_file_is_written_whole_and_its_folder_made(tmp_path):
    path = atomic_write(tmp_path / "run" / "config.json", b'{"seed": 42}')
    assert path == tmp_path / "run" / "config.json" and path.read_bytes() == b'{"seed": 42}'
    assert atomic_write(path, lambda f: f.write(b"by a writer")) == path  # a function that writes to the open file
    assert path.read_bytes() == b"by a writer"
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_a_write_that_fails_half_way_leaves_the_previous_file_whole_and_no_temporary_file(tmp_path):
    path = atomic_write(tmp_path / "global-final.safetensors", b"round 1's model")

    def crashes(f):
        f.write(b"half of round 2's")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, crashes)
    assert path.read_bytes() == b"round 1's model"
    assert [p.name for p in tmp_path.iterdir()] == ["global-final.safetensors"]

    def interrupted(f):  # Ctrl-C in the middle of a write
        f.write(b"{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.json", interrupted)
    assert [p.name for p in tmp_path.iterdir()] == ["global-final.safetensors"]  # no new.json, half or whole
