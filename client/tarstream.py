"""A bounded, streaming reader of gzip'ed tar archives from people we do not trust.

`tarfile` reads PAX and GNU long-name headers whole before any check (a 32 KB gzip can make it
allocate tens of MiB, and more), decompresses bz2/xz by default and raises MemoryError when it
runs out. This reader holds at most `max(MAX_HEADER_BYTES, CHUNK_BYTES)` bytes of the archive at
a time, whatever the archive says:

- only gzip is accepted; bz2, xz, zstd and uncompressed tar are refused by their magic bytes
  before anything is decompressed;
- decompression is pulled in bounded reads (`gzip.GzipFile.read(n)` inflates at most n bytes),
  and the whole decompressed stream is capped (`max_stream_bytes`);
- every 512-byte header's checksum is verified; PAX (`x`, `g`) and GNU long-name (`L`, `K`)
  extension headers are refused when their declared size exceeds `MAX_HEADER_BYTES`, before
  they are read, and at most `MAX_EXTENSIONS` may precede one member;
- a member's data is handed out in chunks of at most `CHUNK_BYTES`; the caller checks sizes
  against its own per-member limits before reading (`Member.size` is known up front).

Errors are `TarStreamError` (a ValueError) with a message for the person who gave the archive.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

BLOCK = 512
CHUNK_BYTES = 1 << 20
MAX_HEADER_BYTES = 64 << 10  # a PAX or long-name header; ours have none, real-world ones are < 1 KiB
MAX_EXTENSIONS = 4  # extension headers in a row before one member
MAX_NAME_CHARS = 1024

GZIP_MAGIC = b"\x1f\x8b"
OTHER_FORMATS = ((b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
                 (b"PK\x03\x04", "zip"), (b"\x5d\x00\x00", "lzma"))

KINDS = {b"0": "file", b"\x00": "file", b"7": "file", b"5": "directory", b"1": "hard link", b"2": "symbolic link",
         b"3": "character device", b"4": "block device", b"6": "fifo"}
EXTENSIONS = {b"x": "PAX header", b"g": "PAX global header", b"L": "GNU long name", b"K": "GNU long link name"}


class TarStreamError(ValueError):
    """The archive is not a gzip'ed tar this reader accepts, or breaks a limit."""


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    kind: str  # "file", "directory", "symbolic link", ... or "type 'S'" for anything unknown


def check_gzip(head: bytes) -> None:
    """Refuse anything but gzip from its first bytes, naming what it is."""
    if head.startswith(GZIP_MAGIC):
        return
    for magic, what in OTHER_FORMATS:
        if head.startswith(magic):
            raise TarStreamError(f"the archive is {what}-compressed; only gzip'ed tar (.tar.gz, as `oppu client "
                                 f"export` writes) is accepted")
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise TarStreamError("the archive is an uncompressed tar; only gzip'ed tar (.tar.gz, as `oppu client "
                             "export` writes) is accepted")
    raise TarStreamError("the archive is not gzip-compressed (no gzip signature); only gzip'ed tar (.tar.gz) "
                         "is accepted")


class TarReader:
    """Iterate the members of a gzip'ed tar read from `raw` (a binary file at its start)."""

    def __init__(self, raw: BinaryIO, *, max_stream_bytes: int) -> None:
        head = raw.read(BLOCK)
        check_gzip(head)
        raw.seek(0)
        self._gz = gzip.GzipFile(fileobj=raw, mode="rb")
        self._max = max_stream_bytes
        self._consumed = 0
        self._left = 0  # data bytes of the current member not yet read
        self._pad = 0  # padding after them

    # -- the decompressed stream ---------------------------------------------------------------

    def _inflate(self, n: int) -> bytes:
        """At most `n` decompressed bytes (fewer at the end of the stream; n is bounded by the
        callers), counted against the stream's cap; damaged gzip data is an error."""
        if self._consumed + n > self._max:
            raise TarStreamError(f"the archive decompresses to more than {self._max} bytes")
        try:
            data = self._gz.read(n)
        except (OSError, EOFError, zlib.error) as e:
            raise TarStreamError(f"damaged gzip data: {e}") from None
        self._consumed += len(data)
        return data

    def _read(self, n: int) -> bytes:
        """Exactly `n` decompressed bytes, or an error."""
        data = self._inflate(n)
        if len(data) != n:
            raise TarStreamError("the archive is truncated (the tar stream ends inside a member)")
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            step = min(n, CHUNK_BYTES)
            self._read(step)
            n -= step

    # -- members -------------------------------------------------------------------------------

    def chunks(self) -> Iterator[bytes]:
        """The current member's data, in chunks of at most CHUNK_BYTES."""
        while self._left > 0:
            step = min(self._left, CHUNK_BYTES)
            data = self._read(step)
            self._left -= step
            yield data

    def next(self) -> Member | None:
        """The next member's header (skipping what the caller did not read of the previous
        member); None at the end of the archive."""
        self._skip(self._left + self._pad)
        self._left = self._pad = 0
        long_name: str | None = None
        pax: dict[str, str] = {}
        for _ in range(MAX_EXTENSIONS + 1):
            block = self._read_header_block()
            if block is None:
                return None
            typeflag = block[156:157]
            size = _size(block)
            if typeflag in EXTENSIONS:
                what = EXTENSIONS[typeflag]
                if size > MAX_HEADER_BYTES:
                    raise TarStreamError(f"a {what} of {size} bytes; at most {MAX_HEADER_BYTES} are accepted")
                data = self._read(size)
                self._read(-size % BLOCK)
                if typeflag == b"L":
                    long_name = _text(data.rstrip(b"\x00"), what)
                elif typeflag == b"x":
                    pax.update(_pax_records(data))
                continue  # 'K' (link target) and 'g' (global defaults) change nothing we accept
            name = pax.get("path") or long_name or _ustar_name(block)
            if "size" in pax:
                if not pax["size"].isdigit():
                    raise TarStreamError(f"member {name[:200]!r}: PAX size {pax['size'][:40]!r} is not a number")
                size = int(pax["size"])
            if len(name) > MAX_NAME_CHARS:
                raise TarStreamError(f"a member name of {len(name)} characters; at most {MAX_NAME_CHARS} are accepted")
            kind = KINDS.get(typeflag, f"type {typeflag.decode('latin-1')!r}")
            if kind != "file" and typeflag in KINDS:
                size = 0  # POSIX: no data follows a directory, link, device or fifo header
            self._left, self._pad = size, -size % BLOCK
            return Member(name, size, kind)
        raise TarStreamError(f"more than {MAX_EXTENSIONS} extension headers before one member")

    def _read_header_block(self) -> bytes | None:
        block = self._read_block_or_eof()
        if block is None or block == bytes(BLOCK):
            return None  # end of archive (a zero block; tar writes two, and may pad further)
        stored = block[148:156]
        try:
            want = int(stored.replace(b"\x00", b" ").strip() or b"-1", 8)
        except ValueError:
            raise TarStreamError("damaged tar header (unreadable checksum)") from None
        if want != sum(block[:148]) + 8 * 32 + sum(block[156:]):
            raise TarStreamError("damaged tar header (checksum mismatch); the archive is corrupt or not a tar")
        return block

    def _read_block_or_eof(self) -> bytes | None:
        data = self._inflate(BLOCK)
        if not data:
            return None
        if len(data) != BLOCK:
            raise TarStreamError("the archive is truncated (a partial tar header)")
        return data

    def close(self) -> None:
        self._gz.close()

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _size(block: bytes) -> int:
    field = block[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.replace(b"\x00", b" ").strip() or b"0", 8)
    except ValueError:
        raise TarStreamError("damaged tar header (unreadable size)") from None


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TarStreamError(f"a {what} that is not UTF-8 text") from None


def _ustar_name(block: bytes) -> str:
    name = block[0:100].split(b"\x00", 1)[0]
    if block[257:262] == b"ustar" and block[263:265] == b"00":  # POSIX ustar: a prefix field
        prefix = block[345:500].split(b"\x00", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return _text(name, "member name")


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse `<len> <key>=<value>\\n` records (POSIX pax), all bounded by the header's size."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos:] == bytes(len(data) - pos):
            break
        space = data.find(b" ", pos, pos + 20)
        if space < 0 or not data[pos:space].isdigit():
            raise TarStreamError("damaged PAX header (bad record length)")
        length = int(data[pos:space])
        record = data[pos:pos + length]
        if length <= space - pos + 1 or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            raise TarStreamError("damaged PAX header (bad record)")
        key, _, value = record[space - pos + 1:-1].partition(b"=")
        out[_text(key, "PAX key")] = _text(value, "PAX value")
        pos += length
    return out
