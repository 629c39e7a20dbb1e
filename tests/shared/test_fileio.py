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


class _Syscalls:
    """Records renames and fsyncs (with what each fsynced fd was: a file, or which directory)."""

    def __init__(self, monkeypatch):
        import os

        self.events: list[tuple] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            st = os.fstat(fd)
            import stat

            self.events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else "file", (st.st_dev, st.st_ino)))
            return real_fsync(fd)

        def replace(src, dst):
            real_replace(src, dst)
            self.events.append(("rename", str(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def dir_synced_after_last_rename(self, directory) -> bool:
        import os

        st = os.stat(directory)
        last = max(i for i, e in enumerate(self.events) if e[0] == "rename")
        return ("fsync", "dir", (st.st_dev, st.st_ino)) in self.events[last + 1:]


def test_atomic_write_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    calls = _Syscalls(monkeypatch)
    f = atomic_write(tmp_path / "personal" / "CURRENT", "v000002\n")
    assert [e for e in calls.events if e[0] == "rename"] == [("rename", str(f))]
    assert calls.events[0][:2] == ("fsync", "file")  # the data first, then the rename
    assert calls.dir_synced_after_last_rename(f.parent), calls.events


def test_atomic_dir_fsyncs_the_parent_after_publishing(tmp_path, monkeypatch):
    atomic_dir(tmp_path / "a", lambda d: (d / "x").write_text("old"))
    calls = _Syscalls(monkeypatch)
    atomic_dir(tmp_path / "a", lambda d: [(d / "sub").mkdir(), (d / "sub" / "y").write_text("new")])
    assert calls.dir_synced_after_last_rename(tmp_path), calls.events
    first_rename = next(i for i, e in enumerate(calls.events) if e[0] == "rename")
    sub = (tmp_path / "a" / "sub").stat()
    # The new tree's files and directories were on disk before it became visible.
    assert ("fsync", "dir", (sub.st_dev, sub.st_ino)) in calls.events[:first_rename]


def test_create_new_is_complete_or_absent_and_never_replaces(tmp_path, monkeypatch):
    import os

    from shared.fileio import create_new

    f = tmp_path / "token"
    assert create_new(f, "first\n", mode=0o600) is True
    assert create_new(f, "second\n") is False and f.read_text() == "first\n"
    assert (f.stat().st_mode & 0o777) == 0o600 and [p.name for p in tmp_path.iterdir()] == ["token"]

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    g = tmp_path / "other"
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        create_new(g, "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]  # nothing half written, no temporaries
