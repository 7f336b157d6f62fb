"""Durable storage of session banks on any fsspec filesystem: snapshots + an append-only WAL.

Layout under one shard's root (``<storage>/shard-<i>/``)::

    sessions/<state_id>.snap      latest snapshot of a session: one record (header JSON + bank bytes)
    wal/<epoch>.log               local disk: append-only log of records, fsync'd per record
    wal/<epoch>/<n>.rec           object stores (s3://, gs://, memory://): one object per record

A record is ``MAGIC | header_len u32 | payload_len u64 | crc32 u32 | header JSON | payload``.
A torn record at the end of a log (crash mid-write) fails its CRC and ends the replay of that log.
Recovery = read every snapshot header, then replay every WAL epoch in order, applying records whose
``seq`` is newer than what the snapshot holds; after a restart writes go to a fresh epoch, so nothing
is ever appended behind a torn record. Old epochs are deleted once every session they touched has
a newer snapshot (see ``SessionBankShard._checkpoint``).

The bank payload is the session state's byte form, owned by ``dnc.state`` (``state_to_bytes``:
safetensors for the tensors plus a JSON metadata entry for the non-tensor fields).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
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
def pack_record(header: dict[str, Any], payload: bytes | None = None) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    p = payload or b""
    crc = zlib.crc32(p, zlib.crc32(h))
    return _PREFIX.pack(MAGIC, len(h), len(p), crc) + h + p


def iter_records(data: bytes) -> Iterator[tuple[dict[str, Any], bytes | None]]:
    """Records of a log, in order; stops at the first torn/corrupt one (a crash mid-append)."""
    off = 0
    while off + _PREFIX.size <= len(data):
        magic, hl, pl, crc = _PREFIX.unpack_from(data, off)
        start = off + _PREFIX.size
        end = start + hl + pl
        if magic != MAGIC or end > len(data):
            return
        h, p = data[start:start + hl], data[start + hl:end]
        if zlib.crc32(p, zlib.crc32(h)) != crc:
            return
        yield json.loads(h), (p if pl else None)
        off = end


def unpack_record(data: bytes) -> tuple[dict[str, Any], bytes | None]:
    for rec in iter_records(data):
        return rec
    raise StorageError("record is truncated or corrupt")


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
        self._fh = None
        self._n = 0
        self.wal_bytes = 0

    # ---- snapshots ----------------------------------------------------------------------
    def _snap_path(self, sid: str) -> str:
        return f"{self._sessions}/{sid}.snap"

    def write_snapshot(self, sid: str, header: dict[str, Any], payload: bytes | None) -> None:
        self._write_atomic(self._snap_path(sid), pack_record(header, payload))

    def read_snapshot(self, sid: str) -> tuple[dict[str, Any], bytes | None]:
        with self.fs.open(self._snap_path(sid), "rb") as f:
            return unpack_record(f.read())

    def read_snapshot_header(self, sid: str) -> dict[str, Any]:
        with self.fs.open(self._snap_path(sid), "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise StorageError(f"snapshot of {sid!r} is truncated")
            magic, hl, _, _ = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise StorageError(f"snapshot of {sid!r} has a bad magic number")
            return json.loads(f.read(hl))

    def delete_snapshot(self, sid: str) -> None:
        try:
            self.fs.rm(self._snap_path(sid))
        except FileNotFoundError:
            pass

    def list_snapshots(self) -> list[str]:
        try:
            names = self.fs.ls(self._sessions, detail=False)
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(n)[:-5] for n in names if n.endswith(".snap"))

    # ---- WAL --------------------------------------------------------------------------------
    def epochs(self) -> list[int]:
        out = set()
        for n in self.fs.ls(self._wal, detail=False):
            base = os.path.basename(n.rstrip("/")).split(".")[0]
            if base.isdigit():
                out.add(int(base))
        return sorted(out)

    def replay(self) -> Iterator[tuple[dict[str, Any], bytes | None]]:
        """Every WAL record of every epoch, oldest first."""
        for e in self.epochs():
            if self.local:
                path = f"{self._wal}/{e:08d}.log"
                if self.fs.exists(path):
                    with self.fs.open(path, "rb") as f:
                        yield from iter_records(f.read())
            else:
                d = f"{self._wal}/{e:08d}"
                try:
                    names = sorted(self.fs.ls(d, detail=False))
                except FileNotFoundError:
                    continue
                for n in names:
                    if n.endswith(".rec"):
                        with self.fs.open(n, "rb") as f:
                            yield from iter_records(f.read())

    def start_epoch(self) -> int:
        """Begin a new WAL epoch for appends (after recovery, and on rotation)."""
        self.close()
        eps = self.epochs()
        self.epoch = (max(eps) + 1) if eps else 1
        self._n = 0
        self.wal_bytes = 0
        if self.local:
            path = f"{self._wal}/{self.epoch:08d}.log"
            self._fh = open(path, "ab")
            _fsync_dir(os.path.dirname(path))
        return self.epoch

    def append(self, header: dict[str, Any], payload: bytes | None = None) -> None:
        """Durably append one record: returns only once it is on stable storage."""
        if self.epoch is None:
            self.start_epoch()
        rec = pack_record(header, payload)
        if self.local:
            self._fh.write(rec)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        else:
            self._n += 1
            self.fs.pipe_file(f"{self._wal}/{self.epoch:08d}/{self._n:010d}.rec", rec)
        self.wal_bytes += len(rec)

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
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    # ---- helpers ----------------------------------------------------------------------------
    def _write_atomic(self, path: str, data: bytes) -> None:
        if self.local:
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
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
