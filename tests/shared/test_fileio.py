"""Atomic writes: a failed write leaves the previous file or directory exactly as it was."""

import pytest

from shared.fileio import atomic_dir, atomic_write


def test_atomic_dir_swaps_in_the_new_contents_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "ckpt"
    atomic_dir(target, lambda d: (d / "a.txt").write_text("one"))
    atomic_dir(target, lambda d: [(d / "b.txt").write_text("two"), (d / "sub").mkdir(), (d / "sub" / "c").write_text("3")])
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["b.txt", "sub", "sub/c"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no .tmp-* or .old-* left behind


def test_a_failing_fill_changes_nothing(tmp_path):
    target = tmp_path / "adapter"
    atomic_dir(target, lambda d: (d / "w.bin").write_bytes(b"old"))

    def half_written(d):
        (d / "w.bin").write_bytes(b"new, but")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_dir(target, half_written)
    assert (target / "w.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_write_replaces_whole_files(tmp_path):
    f = atomic_write(tmp_path / "x" / "state.json", "{}")
    atomic_write(f, b"[1]", mode=0o600)
    assert f.read_bytes() == b"[1]" and (f.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in f.parent.iterdir()] == ["state.json"]
