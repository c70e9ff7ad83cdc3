"""utils/io.py: atomic writes leave either the old file or the complete new one, never a temporary."""

import json
import os

import pytest

from utils.io import atomic_write, write_json_atomic


def test_atomic_write_creates_and_replaces(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    assert atomic_write(path, lambda f: f.write(b"one")) == path
    assert path.read_bytes() == b"one"
    atomic_write(path, lambda f: f.write(b"two"))
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]


def test_atomic_write_error_keeps_old_file_and_removes_temporary(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_write_mode_follows_umask(tmp_path):
    # like open(): 0o666 less the umask, not mkstemp's private 0o600
    umask = os.umask(0)
    os.umask(umask)
    atomic_write(tmp_path / "f", lambda f: f.write(b"x"))
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_json_atomic(tmp_path):
    path = write_json_atomic({"a": [1, 2.5], "b": None}, tmp_path / "x.json")
    assert json.loads(path.read_text()) == {"a": [1, 2.5], "b": None}
    assert path.read_text().endswith("}\n")
    with pytest.raises(TypeError):
        write_json_atomic({"bad": object()}, tmp_path / "y.json")
    assert not (tmp_path / "y.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
