"""Import archives from people we do not trust: gzip only, every header, member and the total
capped while streaming (memory stays small whatever the archive declares), manifests
type-checked, and an import that fails at any step changes nothing."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from client import archive as arc
from client.tarstream import TarReader, TarStreamError
BLOCK, MAX_HEADER_BYTES = 512, 65536
from shared.adapters import AdapterManifest

HIST = json.dumps({"id": "a", "fields": {"description": "x", "tag": "comedy"}, "time": 0}).encode() + b"\n"


def _members(history: bytes = HIST, **manifest_over) -> list[tuple[str, bytes]]:
    m = {"format": "oppu-export", "format_version": 1, "task": "synthetic-tag", "base_model_hash": "h",
         "history_items": history.count(b"\n"), "files": {"history.jsonl": arc.sha256_bytes(history)}}
    m.update(manifest_over)
    return [("oppu-export.json", json.dumps(m).encode()), ("history.jsonl", history)]


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _header(name: bytes, typeflag: bytes, size: int) -> bytes:
    """One ustar header block with a correct checksum (sizes up to 8 GiB in octal)."""
    h = bytearray(BLOCK)
    h[0:len(name)] = name
    h[100:108] = b"0000600\x00"
    h[108:116] = h[116:124] = b"0000000\x00"
    h[124:136] = b"%011o\x00" % size
    h[136:148] = b"00000000000\x00"
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def _gzip_stream(path: Path, parts) -> Path:
    """Write a gzip file from byte strings and (unit, times) runs, without holding the runs."""
    with gzip.open(path, "wb", compresslevel=6) as out:
        for part in parts:
            if isinstance(part, tuple):
                unit, times = part
                per_block = max(1, (1 << 20) // len(unit))
                while times > 0:
                    out.write(unit * min(times, per_block))
                    times -= per_block
            else:
                out.write(part)
    return path


def _read(path: Path, tmp_path: Path, *, max_bytes: int = 1 << 30) -> arc.Archive:
    return arc.read_archive(path, tmp_path / "work", max_bytes=max_bytes, task="synthetic-tag")


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


# ------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("kind", ["bz2", "xz", "plain tar"])
def test_only_gzip_is_accepted(tmp_path, kind):
    data = _tar_bytes(_members())
    packed = {"bz2": bz2.compress, "xz": lzma.compress, "plain tar": lambda b: b}[kind](data)
    path = tmp_path / "a.tar"
    path.write_bytes(packed)
    name = {"bz2": "bzip2-compressed", "xz": "xz-compressed", "plain tar": "uncompressed tar"}[kind]
    with pytest.raises(arc.ArchiveError, match=f"{name}.*only gzip'ed tar"):
        _read(path, tmp_path)
    assert list((tmp_path / "work").iterdir()) == []


def test_a_valid_gzip_archive_still_reads(tmp_path):
    path = tmp_path / "a.tar.gz"
    path.write_bytes(gzip.compress(_tar_bytes(_members())))
    a = _read(path, tmp_path)
    assert a.history[0]["id"] == "a" and a.manifest.history_items == 1
    a.cleanup()


# ------------------------------------------------------------------------------- bombs


BOMB = 48 << 20  # what the header declares (and holds): 48 MiB of zeros, ~50 KB gzip'ed


@pytest.mark.parametrize("typeflag,what", [(b"x", "PAX header"), (b"L", "GNU long name"), (b"g", "PAX global header")])
def test_extension_header_bombs_are_refused_before_being_read(tmp_path, typeflag, what):
    """tarfile reads PAX and long-name headers whole before any check: this 50 KB file made it
    allocate more than 48 MiB."""
    path = _gzip_stream(tmp_path / "bomb.tar.gz", [_header(b"././@PaxHeader", typeflag, BOMB), (b"\x00", BOMB),
                                                   _header(b"history.jsonl", b"0", 0), bytes(2 * BLOCK)])
    assert path.stat().st_size < 200_000
    err: list = []

    def attempt():
        try:
            _read(path, tmp_path)
        except arc.ArchiveError as e:
            err.append(str(e))

    peak = _peak_mib(attempt)
    assert err and f"a {what} of {BOMB} bytes; at most {MAX_HEADER_BYTES}" in err[0]
    assert peak < 4, f"reading the archive allocated {peak:.1f} MiB"


def test_a_chain_of_small_extension_headers_is_refused(tmp_path):
    record = b"20 comment=xxxxxxxx\n"
    chain = b"".join(_header(b"pax", b"x", len(record)) + record.ljust(BLOCK, b"\x00") for _ in range(50))
    path = _gzip_stream(tmp_path / "chain.tar.gz", [chain, _header(b"history.jsonl", b"0", 0), bytes(2 * BLOCK)])
    with pytest.raises(arc.ArchiveError, match="more than 4 extension headers before one member"):
        _read(path, tmp_path)


def test_oversize_members_are_refused_from_their_header_without_reading_them(tmp_path):
    """A member declaring (and holding) 48 MiB of zeros under a 1 MiB limit: refused at its header."""
    head = _tar_bytes(_members())[:-2 * BLOCK]  # a valid start, end-of-archive marker removed
    path = _gzip_stream(tmp_path / "big.tar.gz", [head.replace(b"history.jsonl", b"history.jsonx", 1),
                                                  _header(b"history.jsonl", b"0", BOMB), (b"\x00", BOMB),
                                                  bytes(2 * BLOCK)])
    err: list = []

    def attempt():
        try:
            _read(path, tmp_path, max_bytes=1 << 20)
        except arc.ArchiveError as e:
            err.append(str(e))

    peak = _peak_mib(attempt)
    assert err, "the archive was accepted"
    # Either member may be named first; what matters is that nothing big was read or kept.
    assert peak < 4, f"reading the archive allocated {peak:.1f} MiB"


def test_sizes_declared_by_pax_and_in_total_are_capped(tmp_path):
    # A PAX record overriding the member's size with 10 GiB (nested inside a valid header).
    rec = b"size=10737418240\n"
    rec = b"%d " % (len(rec) + 3) + rec
    path = _gzip_stream(tmp_path / "pax-size.tar.gz", [_header(b"pax", b"x", len(rec)), rec.ljust(BLOCK, b"\x00"),
                                                       _header(b"history.jsonl", b"0", 10), bytes(3 * BLOCK)])
    with pytest.raises(arc.ArchiveError, match=r"'history.jsonl' is 10737418240 bytes; the limit is 1048576"):
        _read(path, tmp_path, max_bytes=1 << 20)
    # Each member under its limit, together over the total.
    hist = b"\n" * 600_000
    members = _members(hist) + [("profile.json", b" " * 600_000)]
    path = tmp_path / "total.tar.gz"
    path.write_bytes(gzip.compress(_tar_bytes(members)))
    with pytest.raises(arc.ArchiveError, match="'profile.json' is 600000 bytes; the limit is"):
        _read(path, tmp_path, max_bytes=1 << 20)


def test_truncated_and_corrupt_streams_are_refused(tmp_path):
    good = gzip.compress(_tar_bytes(_members()))
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(arc.ArchiveError, match="truncated|damaged"):
        _read(path, tmp_path)
    bad = bytearray(_tar_bytes(_members()))
    bad[10] ^= 0xFF  # a name byte: the header's checksum no longer matches
    path.write_bytes(gzip.compress(bytes(bad)))
    with pytest.raises(arc.ArchiveError, match="checksum"):
        _read(path, tmp_path)



@pytest.mark.parametrize("cap", [700, 1100])
def test_the_decompressed_stream_is_capped_in_headers_and_in_data(cap):
    """One bounded read serves both: the cap is hit in a member's data (700: inside the first
    member, after its 512-byte header) and at a header (1100: the second header)."""
    data = _tar_bytes([("a", b"x" * 300), ("b", b"y")])
    with TarReader(io.BytesIO(gzip.compress(data)), max_stream_bytes=cap) as reader:
        with pytest.raises(TarStreamError, match=f"the archive decompresses to more than {cap} bytes"):
            while reader.next() is not None:
                b"".join(reader.chunks())


# ------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("field,value,needle", [
    ("history_items", "1", "history_items must be a whole number >= 0, not '1'"),
    ("history_items", True, "history_items must be a whole number"),
    ("created", "yesterday", "created must be a finite number"),
    ("personal_version", "2", "personal_version must be a whole number >= 1"),
    ("task", ["synthetic-tag"], "task must be a non-empty string"),
    ("extra", 1, "unknown field(s) 'extra'"),
])
def test_manifest_fields_are_type_checked_by_name(tmp_path, field, value, needle):
    path = tmp_path / "a.tar.gz"
    path.write_bytes(gzip.compress(_tar_bytes(_members(**{field: value}))))
    with pytest.raises(arc.ArchiveError) as e:
        _read(path, tmp_path)
    assert f"oppu-export.json: {needle}" in str(e.value)


# ------------------------------------------------------------------------------- import, whole


def _service(engine, directory):
    from client.service import ClientService
    from client.settings import DaemonSpec
    from shared.config import TrainSpec

    spec = DaemonSpec(task="synthetic-tag", retrain_after=0, personal_adapter=engine.personal_adapter_spec,
                      personal_train=TrainSpec(epochs=1, batch_size=4))
    return ClientService(spec, directory, engine=engine)


def _export_with_adapter(engine, tmp_path, *, data=None) -> Path:
    """An export of 6 items, a profile and a personal adapter (the engine's fresh slot)."""
    from client.personal import PersonalAdapters
    from shared.records import HistoryItem

    engine.reset_personal()
    pa = PersonalAdapters(tmp_path / "source-personal")
    v = pa.publish(lambda t: engine.save_personal(t, AdapterManifest(
        role="personal", base_model_hash=engine.model_hash, task="synthetic-tag", peft_type="lora",
        data=data if data is not None else {"history_items": 6})))
    items = [HistoryItem(f"i{j}", {"description": f"film {j}", "tag": "comedy"}, j) for j in range(6)]
    out = tmp_path / "export.tar.gz"
    arc.write_archive(out, task="synthetic-tag", base_model_hash=engine.model_hash, items=items,
                      profile="likes comedy", adapter_dir=pa.path(v), personal_version=v)
    return out


def _status(svc) -> dict:
    s = svc.status()
    s["daemon"].pop("uptime_s")
    return s


def _personal_listing(svc) -> list[str]:
    root = svc.dir / "personal"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_failed_history_write_on_a_fresh_install_leaves_no_adapter_and_status_unchanged(tiny_engine, tmp_path,
                                                                                        monkeypatch):
    """The adapter used to be published before the history was written: with no earlier version
    to roll back to, a failed history write left the imported adapter answering."""
    archive = _export_with_adapter(tiny_engine, tmp_path)
    svc = _service(tiny_engine, tmp_path / "fresh")
    try:
        before, listing = _status(svc), _personal_listing(svc)
        real_add = svc.store.add

        def disk_full_midway(items):
            real_add(items[:3])  # some records reach the store, then the disk is full
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(svc.store, "add", disk_full_midway)
        with pytest.raises(OSError, match="No space left"):
            svc.import_archive(archive)
        monkeypatch.undo()
        assert svc.host.published is None and svc.personal.current_version() is None
        assert svc.personal.versions() == []
        assert set(_personal_listing(svc)) - set(listing) <= {".lock"}  # at most the empty flock file
        assert _status(svc) == before
        assert svc.count() == 0 and svc.store.get_profile() is None
        assert list((svc.dir / "tmp").iterdir()) == []
        # The same archive imports whole once the disk has room.
        res = svc.import_archive(archive)
        assert res["history_added"] == 6 and res["personal_version"] == 1 and res["archive_personal_version"] == 1
        assert svc.status()["personal_adapter"]["version"] == 1 and svc.count() == 6
    finally:
        svc.close()


def test_failed_publish_undoes_the_history_and_profile(tiny_engine, tmp_path, monkeypatch):
    from client.personal import PersonalAdapters

    archive = _export_with_adapter(tiny_engine, tmp_path)
    svc = _service(tiny_engine, tmp_path / "fresh")
    try:
        before = _status(svc)

        def current_not_written(self, version):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(PersonalAdapters, "_make_current", current_not_written)
        with pytest.raises(OSError, match="Input/output"):
            svc.import_archive(archive)
        monkeypatch.undo()
        assert _status(svc) == before and svc.count() == 0 and svc.store.get_profile() is None
        assert svc.personal.versions() == []
    finally:
        svc.close()


def test_adapter_manifest_with_a_string_count_is_refused_by_field(tiny_engine, tmp_path):
    """A string history count in the adapter's manifest used to be imported, and /v1/status and
    every /v1/history write failed with 500 afterwards."""
    archive = _export_with_adapter(tiny_engine, tmp_path, data={"history_items": "6"})
    svc = _service(tiny_engine, tmp_path / "fresh")
    try:
        before = _status(svc)
        with pytest.raises(arc.ArchiveError,
                           match=r"personal/oppu_adapter.json: data.history_items must be a whole number >= 0, not '6'"):
            svc.import_archive(archive)
        assert _status(svc) == before and svc.count() == 0
    finally:
        svc.close()


@pytest.mark.slow
def test_rss_stays_small_reading_a_large_archive(tmp_path):
    """A 200 MiB history streams through in bounded chunks: the process's peak RSS grows by far
    less than the member."""
    import subprocess
    import sys

    line = json.dumps({"id": "x", "fields": {"description": "y" * 100, "tag": "comedy"}, "time": 0}).encode() + b"\n"
    n = (200 << 20) // len(line)
    path = tmp_path / "big.tar.gz"
    # Declares a history whose sha256 cannot match (computing it would take the test's time);
    # the point is the memory used while copying it out, before the hash check refuses it.
    manifest = json.dumps({"format": "oppu-export", "format_version": 1, "task": "synthetic-tag",
                           "base_model_hash": "h", "history_items": n, "files": {"history.jsonl": "0" * 64}}).encode()
    _gzip_stream(path, [_header(b"oppu-export.json", b"0", len(manifest)),
                        manifest + bytes(-len(manifest) % BLOCK),
                        _header(b"history.jsonl", b"0", n * len(line)), (line, n),
                        bytes(-(n * len(line)) % BLOCK), bytes(2 * BLOCK)])
    code = ("import resource, sys; from client import archive as arc\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    arc.read_archive(sys.argv[1], sys.argv[2], max_bytes=1 << 30, task='synthetic-tag')\n"
            "except arc.ArchiveError as e:\n    print('refused:', e)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "work")], capture_output=True,
                         text=True, check=True, env={**os.environ}).stdout.splitlines()
    assert out[0].startswith("refused:") and "sha256" in out[0]
    assert float(out[-1]) < 64, f"peak RSS grew by {out[-1]} MiB reading a 200 MiB member"
