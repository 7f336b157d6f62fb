"""Durable storage of session banks on any fsspec filesystem: snapshots + an append-only WAL.

Layout under one shard's root (``<storage>/shard-<i>/``)::

    sessions/<name>.snap          latest snapshot of a session: one record (header JSON + bank bytes);
                                  <name> is the state_id, plus ".<mask>" when it has capitals
                                  (``snapshot_name``: ids are case-sensitive, some filesystems are not)
    wal/<epoch>.log               local disk: append-only log of records, fsync'd per record
    wal/<epoch>/<n>.rec           object stores (s3://, gs://, memory://): one object per record

A record (format 2, see ``pack_record``) is a fixed-size prefix with its own CRC (lengths, the
record's session id, seq and incarnation, and the CRCs of header and payload), then the header JSON
and the payload. Reading checks all three CRCs: a damaged record is skipped and reported (naming its
session when the prefix is intact, else found again by scanning for the next record), so one bad
record never hides the records after it. A failed append is truncated away and the log rolls to a
new file, so nothing is ever acknowledged behind a torn record. Snapshots are one such record;
format-1 logs and snapshots (one CRC, no prefix CRC) still load.
Recovery = read every snapshot header, then replay every WAL epoch in order, applying records whose
``seq`` is newer than what the snapshot holds; after a restart writes go to a fresh epoch. Old epochs
are deleted once every session they touched has a newer snapshot (see ``SessionBankShard.checkpoint``).
Damage found is also appended to ``damage.jsonl`` under the shard's root.

Records of a session: ``create``, ``put`` (a full state: the payload is the session state's byte
form, owned by ``dnc.state``: ``state_to_bytes``, safetensors for the tensors plus a JSON metadata
entry for the non-tensor fields), ``turn`` (a turn that changed the state only by tokens, issue 14:
the payload is the turn's token ids, 4 bytes each, and the header holds how many were the prompt,
the session's digest chain and a fingerprint of the state left; see ``serve.sessions.turn_log``)
and ``delete``. A snapshot holds a session's last full state as its payload and the token turns
after it in its header.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib
from typing import Any, Iterator

import fsspec

from dnc.state import export_from_bytes, export_to_bytes

MAGIC = b"DNCW"
_PREFIX = struct.Struct("<4sIQI")  # magic, header_len, payload_len, crc32(header+payload)


class StorageError(RuntimeError):
    """A stored record is unreadable (wrong magic, bad CRC, truncated)."""


# --------------------------------------------------------------------------- bank codec
# The session state's byte format belongs to the model library (dnc/state.py); these names stay
# for the store's callers.
encode_bank = export_to_bytes
decode_bank = export_from_bytes


def digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()[:16]


# --------------------------------------------------------------------------- records
# Record framing (format 2). Every field a reader needs to find the next record and to name what a
# damaged record belonged to is in a fixed-size prefix with its own CRC, so a flipped bit anywhere
# costs that one record, never the records after it:
#   magic "DNW2" | header_len u32 | payload_len u64 | seq i64 | sid_len u8 | sid 64s | inc 16s
#   | crc32(header) u32 | crc32(payload) u32 | crc32(all of the above) u32 | header JSON | payload
# Format 1 ("DNCW", one CRC over header+payload, no prefix CRC) is still read.
MAGIC = b"DNW2"
MAGIC_V1 = b"DNCW"
_PREFIX = struct.Struct("<4sIQqB64s16sIII")
_PREFIX_V1 = struct.Struct("<4sIQI")  # magic, header_len, payload_len, crc32(header+payload)
_MAX_HEADER = 64 * 2**20


class RecordDamage(StorageError):
    """One unreadable record; ``sid``/``seq``/``inc`` are known when its prefix was intact."""

    def __init__(self, reason: str, offset: int = 0, length: int = 0, sid: str | None = None,
                 seq: int | None = None, inc: str | None = None, torn: bool = False):
        super().__init__(reason)
        self.reason, self.offset, self.length = reason, offset, length
        self.sid, self.seq, self.inc, self.torn = sid, seq, inc, torn

    def report(self) -> dict[str, Any]:
        return {"reason": self.reason, "offset": self.offset, "length": self.length, "sid": self.sid,
                "seq": self.seq, "inc": self.inc, "torn": self.torn}


def pack_record(header: dict[str, Any], payload: bytes | None = None) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    p = payload or b""
    sid = str(header.get("sid", "")).encode()[:64]
    inc = str(header.get("inc", "")).encode()[:16]
    seq = int(header.get("seq", -1))
    fields = (MAGIC, len(h), len(p), seq, len(sid), sid, inc, zlib.crc32(h), zlib.crc32(p))
    body = _PREFIX.pack(*fields, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body)) + h + p


def _parse_prefix(data: bytes, off: int) -> tuple[int, int, dict[str, Any], int, int]:
    """A format-2 prefix at ``off``: (header_len, payload_len, {sid, seq, inc}, header_crc, payload_crc)."""
    _, hl, pl, seq, sl, sid, inc, hcrc, pcrc, prefix_crc = _PREFIX.unpack_from(data, off)
    if zlib.crc32(data[off:off + _PREFIX.size - 4]) != prefix_crc or sl > 64 or hl > _MAX_HEADER:
        raise RecordDamage("record prefix fails its checksum", off, 0)
    names = dict(sid=sid[:sl].decode(errors="replace"), seq=seq, inc=inc.rstrip(b"\0").decode(errors="replace"))
    return hl, pl, names, hcrc, pcrc


def _parse_one(data: bytes, off: int) -> tuple[dict[str, Any], bytes | None, int]:
    """The record at ``off``: (header, payload or None, end offset); raises :class:`RecordDamage`."""
    left = len(data) - off
    magic = data[off:off + 4]
    if magic == MAGIC_V1:
        if left < _PREFIX_V1.size:
            raise RecordDamage("record prefix is cut short", off, left, torn=True)
        _, hl, pl, crc = _PREFIX_V1.unpack_from(data, off)
        start = off + _PREFIX_V1.size
        end = start + hl + pl
        if end > len(data):
            raise RecordDamage("record is cut short", off, left, torn=True)
        h, p = data[start:start + hl], data[start + hl:end]
        if zlib.crc32(p, zlib.crc32(h)) != crc:
            raise RecordDamage("record fails its checksum (format 1)", off, 0)  # lengths unprotected: rescan
        return json.loads(h), (p if pl else None), end
    if magic != MAGIC:
        raise RecordDamage("no record starts here (bad magic number)", off, 0, torn=left < _PREFIX.size)
    if left < _PREFIX.size:
        raise RecordDamage("record prefix is cut short", off, left, torn=True)
    hl, pl, names, hcrc, pcrc = _parse_prefix(data, off)
    start = off + _PREFIX.size
    end = start + hl + pl
    if end > len(data):
        raise RecordDamage("record is cut short", off, left, torn=True, **names)
    h, p = data[start:start + hl], data[start + hl:end]
    if zlib.crc32(h) != hcrc:
        raise RecordDamage("record header fails its checksum", off, end - off, **names)
    if zlib.crc32(p) != pcrc:
        raise RecordDamage("record payload fails its checksum", off, end - off, **names)
    return json.loads(h), (p if pl else None), end


def _next_magic(data: bytes, off: int) -> int:
    hits = [i for i in (data.find(MAGIC, off), data.find(MAGIC_V1, off)) if i >= 0]
    return min(hits) if hits else len(data)


def iter_records(data: bytes, on_damage=None) -> Iterator[tuple[dict[str, Any], bytes | None]]:
    """Records of a log, in order. A damaged record is reported to ``on_damage(RecordDamage)`` and
    skipped: by its length when its prefix is intact, else by scanning for the next record's magic
    (a false magic inside a payload fails the prefix CRC). A record cut short at the end of the log
    (a crash mid-append, never acknowledged) is reported with ``torn=True``."""
    off = 0
    while off < len(data):
        try:
            header, payload, end = _parse_one(data, off)
        except RecordDamage as d:
            if d.torn and d.sid is not None:
                # a format-2 record whose intact prefix (its CRC holds the lengths) runs past the end: the
                # torn tail. Nothing follows it; scanning its bytes for a magic would take a magic inside
                # its header (a user's text) or payload for a record and report this one as damage
                nxt = len(data)
            elif d.length and not d.torn:
                nxt = off + d.length  # prefix intact: the lengths are right
            else:
                nxt = _next_magic(data, off + 1)
                d.torn = d.torn and nxt == len(data)
                d.length = nxt - off
            if on_damage is not None:
                on_damage(d)
            off = nxt
            continue
        yield header, payload
        off = end


def unpack_record(data: bytes) -> tuple[dict[str, Any], bytes | None]:
    """Exactly one intact record (a snapshot); raises :class:`RecordDamage` saying what is wrong."""
    if len(data) < 4:
        raise RecordDamage(f"file is truncated ({len(data)} bytes)", 0, len(data), torn=True)
    header, payload, end = _parse_one(data, 0)
    if end != len(data):
        raise RecordDamage(f"{len(data) - end} unexpected bytes after the record", end, len(data) - end)
    return header, payload


# --------------------------------------------------------------------------- snapshot names
def snapshot_name(sid: str) -> str:
    """The file name (without ``.snap``) of ``sid``'s snapshot: the id itself when it has no capital
    letter, else the id and a hex mask of where its capitals are (``"Chat"`` -> ``"Chat.1"``).

    State ids are case-sensitive (``[A-Za-z0-9_-]``), but a storage directory may not be: macOS and
    Windows disks fold case, so ``Chat.snap`` and ``chat.snap`` were one file. The second session's
    snapshot replaced the first's, which then loaded as damaged (or vanished at a restart). A name
    with its mask differs from every other id's name even with case folded, and gives the id back
    (:func:`snapshot_sid`). Ids without capitals (server-made ones, ``s-<hex>``) keep the old name."""
    mask = sum(1 << i for i, c in enumerate(sid) if "A" <= c <= "Z")
    return f"{sid}.{mask:x}" if mask else sid


def snapshot_sid(name: str) -> str:
    """The state id of a snapshot file name (without ``.snap``): :func:`snapshot_name` inverted. A
    name without a mask is the id as it is (old names of ids with capitals included)."""
    if "." not in name:
        return name
    stem, mask = name.split(".", 1)
    try:
        bits = int(mask, 16)
    except ValueError:
        return name
    return "".join(c.upper() if bits >> i & 1 else c.lower() for i, c in enumerate(stem))


def _record_sid(data: bytes) -> str | None:
    """The session id a snapshot file's record names (format 2: its checksummed prefix; format 1:
    its header). Raises :class:`RecordDamage` / ``ValueError`` when it cannot be read."""
    if data[:4] == MAGIC_V1:
        return unpack_record(data)[0].get("sid")
    return _parse_prefix(data, 0)[2]["sid"]


# --------------------------------------------------------------------------- store
class BankStore:
    """Snapshot + WAL storage for one shard under ``uri`` (a local path or any fsspec URI)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.root = self.root.rstrip("/")
        self.local = "file" in _protocols(self.fs)
        self._sessions = f"{self.root}/sessions"
        self._wal = f"{self.root}/wal"
        for d in (self._sessions, self._wal):
            self.fs.makedirs(d, exist_ok=True)
        self.epoch: int | None = None
        self._fd: int | None = None  # the open log (local disk); raw fd: no buffer to replay a torn write
        self._size = 0
        self._roll = False
        self._n = 0
        self.wal_bytes = 0
        self._legacy: set[str] = set()  # ids with capitals whose snapshot still has its old name

    # ---- snapshots ----------------------------------------------------------------------
    def _snap_path(self, sid: str) -> str:
        """Where ``sid``'s snapshot is: its old name (``<sid>.snap``) while that file is still its
        (see ``list_snapshots``), else :func:`snapshot_name`'s."""
        if sid in self._legacy:
            return self._legacy_path(sid)
        return f"{self._sessions}/{snapshot_name(sid)}.snap"

    def _legacy_path(self, sid: str) -> str:
        return f"{self._sessions}/{sid}.snap"

    def write_snapshot(self, sid: str, header: dict[str, Any], payload: bytes | None) -> None:
        legacy = sid in self._legacy
        self._legacy.discard(sid)
        try:
            self._write_atomic(self._snap_path(sid), pack_record(header, payload))
        except BaseException:
            if legacy:
                self._legacy.add(sid)
            raise
        if legacy:  # its new name holds it now; on a disk that folds case the old name may be another
            self._remove_legacy(sid)  # id's file (``chat.snap`` for ``Chat``): removed only if it is this one's

    def _remove_legacy(self, sid: str) -> None:
        path = self._legacy_path(sid)
        try:
            with self.fs.open(path, "rb") as f:
                name = _record_sid(f.read())
            if name == sid:
                self.fs.rm(path)
        except (OSError, RecordDamage, struct.error, ValueError):
            pass  # left behind; its header names a session that now has a newer file

    def read_snapshot(self, sid: str) -> tuple[dict[str, Any], bytes | None]:
        """The snapshot's header and bank, both checksummed; raises :class:`RecordDamage`."""
        with self.fs.open(self._snap_path(sid), "rb") as f:
            data = f.read()
        header, payload = unpack_record(data)
        if header.get("sid") != sid:
            raise RecordDamage(f"snapshot file of {sid!r} holds session {header.get('sid')!r}", 0, len(data))
        return header, payload

    def read_snapshot_header(self, sid: str) -> dict[str, Any]:
        """The snapshot's header alone (its checksum checked; the bank's is checked when it is read)."""
        with self.fs.open(self._snap_path(sid), "rb") as f:
            head = f.read(_PREFIX.size)
            if head[:4] == MAGIC_V1:  # format 1: one CRC over header + bank, so read it all
                f.seek(0)
                header, _ = unpack_record(f.read())
            else:
                if len(head) < _PREFIX.size:
                    raise RecordDamage(f"snapshot is truncated ({len(head)} bytes)", 0, len(head), torn=True)
                hl, _, names, hcrc, _ = _parse_prefix(head, 0)
                h = f.read(hl)
                if len(h) < hl:
                    raise RecordDamage("snapshot is truncated inside its header", 0, len(head) + len(h), torn=True,
                                       **names)
                if zlib.crc32(h) != hcrc:
                    raise RecordDamage("snapshot header fails its checksum", 0, len(head) + len(h), **names)
                header = json.loads(h)
        if header.get("sid") != sid:
            raise RecordDamage(f"snapshot file of {sid!r} holds session {header.get('sid')!r}")
        return header

    def append_report(self, entry: dict[str, Any]) -> None:
        """Keep a damage report on storage next to what it describes (``damage.jsonl``)."""
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        if self.local:
            with open(f"{self.root}/damage.jsonl", "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        else:
            self.fs.pipe_file(f"{self.root}/damage/{time.time_ns()}.json", line.encode())

    def quarantine_snapshot(self, sid: str) -> str | None:
        """Copy a damaged snapshot aside (``<sid>.snap.damaged``) before it is replaced by a marker."""
        src, dst = self._snap_path(sid), f"{self._snap_path(sid)}.damaged"
        try:
            self.fs.cp_file(src, dst)
            return dst
        except FileNotFoundError:
            return None

    def delete_snapshot(self, sid: str) -> None:
        if sid in self._legacy:
            self._remove_legacy(sid)
            self._legacy.discard(sid)
        try:
            self.fs.rm(self._snap_path(sid))
        except FileNotFoundError:
            pass

    def list_snapshots(self) -> list[str]:
        """The state ids that have a snapshot. An id with capitals whose only file has the old name
        (``<sid>.snap``, written before :func:`snapshot_name`) is moved to its new name here (or, when
        storage refuses, read from the old one until its next snapshot)."""
        try:
            names = self.fs.ls(self._sessions, detail=False)
        except FileNotFoundError:
            return []
        stems = {os.path.basename(n)[:-5] for n in names if n.endswith(".snap")}
        sids = {snapshot_sid(n) for n in stems}
        self._legacy = {s for s in sids if s in stems and snapshot_name(s) not in stems and snapshot_name(s) != s}
        for sid in sorted(self._legacy):
            held = self._move_legacy(sid)
            if held is not None and held != sid and held.lower() == sid.lower():
                sids.add(held)  # a case-folding disk where the old names collided: the file is ``held``'s
        return sorted(sids)

    def _move_legacy(self, sid: str) -> str | None:
        """Copy an old-named snapshot (``Chat.snap``) to its new name now, not at its next snapshot:
        on a disk that folds case, the old name is also the new name of the id in lower case
        (``chat.snap``), whose first snapshot would overwrite it. Left as it is on a storage error
        (read from the old name meanwhile). Returns the id the file holds (None: unreadable): on
        such a disk, where the old names already collided, another case of ``sid``."""
        try:
            with self.fs.open(self._legacy_path(sid), "rb") as f:
                data = f.read()
            held = _record_sid(data)
            if held != sid:
                return held  # another id's file under that name (a disk that folds case): not this one's
            self._write_atomic(f"{self._sessions}/{snapshot_name(sid)}.snap", data)
        except (OSError, RecordDamage, struct.error, ValueError):
            return None
        self._legacy.discard(sid)
        self._remove_legacy(sid)
        return sid

    # ---- WAL --------------------------------------------------------------------------------
    def epochs(self) -> list[int]:
        out = set()
        for n in self.fs.ls(self._wal, detail=False):
            base = os.path.basename(n.rstrip("/")).split(".")[0]
            if base.isdigit():
                out.add(int(base))
        return sorted(out)

    def replay(self, on_damage=None) -> Iterator[tuple[dict[str, Any], bytes | None]]:
        """Every readable WAL record of every epoch, oldest first. Damaged records are skipped and
        reported to ``on_damage(RecordDamage)``, whose ``where`` names the log file (or object)."""

        def report(where):
            def cb(d: RecordDamage):
                d.where = where
                if on_damage is not None:
                    on_damage(d)
            return cb

        for e in self.epochs():
            if self.local:
                path = f"{self._wal}/{e:08d}.log"
                if self.fs.exists(path):
                    with self.fs.open(path, "rb") as f:
                        yield from iter_records(f.read(), report(f"wal/{e:08d}.log"))
            else:
                d = f"{self._wal}/{e:08d}"
                try:
                    names = sorted(self.fs.ls(d, detail=False))
                except FileNotFoundError:
                    continue
                for n in names:
                    if n.endswith(".rec"):
                        with self.fs.open(n, "rb") as f:
                            yield from iter_records(f.read(), report(f"wal/{e:08d}/{os.path.basename(n)}"))

    def start_epoch(self) -> int:
        """Begin a new WAL epoch (a new log file) for appends: after recovery, on rotation, and after
        a failed append (nothing is ever appended behind a record that may be torn)."""
        self.close()
        self._roll = True  # until the new log is open: an append must not go anywhere else
        eps = self.epochs()
        self.epoch = max([*eps, self.epoch or 0]) + 1
        self._n = 0
        self.wal_bytes = 0
        if self.local:
            path = f"{self._wal}/{self.epoch:08d}.log"
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._size = os.fstat(self._fd).st_size
            _fsync_dir(os.path.dirname(path))
        self._roll = False
        return self.epoch

    def append(self, header: dict[str, Any], payload: bytes | None = None) -> int:
        """Durably append one record: returns (its size in bytes) only once it is on stable storage.

        On a failure (ENOSPC, EIO...) the OSError propagates, and nothing is left for later records
        to hide behind: a partly written record is truncated away, and the next append goes to a new
        log file anyway (after a failed fsync the kernel may have dropped pages of this one)."""
        if self.epoch is None or self._roll:
            self.start_epoch()
        rec = pack_record(header, payload)
        if self.local:
            start = self._size
            try:
                view = memoryview(rec)
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)
            except OSError:
                self._roll = True
                try:
                    os.ftruncate(self._fd, start)
                    os.fsync(self._fd)
                except OSError:
                    pass  # the roll alone keeps later records out of this file
                raise
            self._size += len(rec)
        else:
            path = f"{self._wal}/{self.epoch:08d}/{self._n + 1:010d}.rec"
            self.fs.pipe_file(path, rec)  # a put is atomic: nothing torn to clean up
            self._n += 1
        self.wal_bytes += len(rec)
        return len(rec)

    def delete_epochs_before(self, epoch: int) -> int:
        n = 0
        for e in self.epochs():
            if e < epoch:
                p = f"{self._wal}/{e:08d}.log" if self.local else f"{self._wal}/{e:08d}"
                try:
                    self.fs.rm(p, recursive=not self.local)
                    n += 1
                except FileNotFoundError:
                    pass
        return n

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    # ---- helpers ----------------------------------------------------------------------------
    def _write_atomic(self, path: str, data: bytes) -> None:
        if self.local:
            tmp = f"{path}.tmp-{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except OSError:  # e.g. ENOSPC: the old file stays; do not leave a partial temp file behind
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            _fsync_dir(os.path.dirname(path))
        else:  # object stores: a put is atomic
            self.fs.pipe_file(path, data)


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
