"""iclcls.io: the one module for durable files (fsync, atomic writes, atomic folder swap)."""

from __future__ import annotations

import errno
import os

import pytest

from iclcls import io


def _tree(path, text):
    path.mkdir()
    (path / "f.txt").write_text(text)
    (path / "sub").mkdir()
    (path / "sub" / "g.txt").write_text(text)
    return path


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_swaps_in_the_new_folder_and_drops_the_old(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # the portable rename-aside path
    dst = _tree(tmp_path / "state", "old")
    io.replace_dir(_tree(tmp_path / "new", "new"), dst)
    assert (dst / "sub" / "g.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    io.replace_dir(_tree(tmp_path / "new2", "first"), tmp_path / "fresh")  # no folder there yet
    assert (tmp_path / "fresh" / "f.txt").read_text() == "first"


def test_replace_dir_keeps_the_old_folder_when_the_rename_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    dst, new, real = _tree(tmp_path / "state", "old"), _tree(tmp_path / "new", "new"), os.replace

    def failing(src, target):
        if src == new:  # the new state's rename into place
            raise OSError(errno.EROFS, "Read-only file system", str(target))
        return real(src, target)

    monkeypatch.setattr(io.os, "replace", failing)
    with pytest.raises(OSError, match="Read-only"):
        io.replace_dir(new, dst)
    assert (dst / "f.txt").read_text() == "old" and not list(tmp_path.glob(".state.old-*"))


def test_fsync_file_takes_a_path_an_open_file_or_a_descriptor(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.write(b"buffered")
        io.fsync_file(f)  # flushes Python's buffer first
        assert p.read_bytes() == b"buffered"
        io.fsync_file(f.fileno())
    io.fsync_file(p)
    assert len(synced) == 3
