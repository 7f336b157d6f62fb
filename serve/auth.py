"""API keys, owners, origins and the bind rule.

* Keys map to owners: ``DNC_API_KEYS="alice:KEY1,bob:KEY2"`` and/or a file (``AppArgs.api_keys_file``,
  one ``owner:key`` a line, ``#`` comments). Clients send ``Authorization: Bearer KEY`` (as OpenAI
  clients do). With keys on, the owner is the key's: ``X-Owner``, ``owner`` and ``user`` cannot change it.
* Without keys the server trusts ``X-Owner`` (default ``anonymous``): fit for loopback only, so
  :func:`check_bind` refuses any other bind address without keys.
* The ingress holds only SHA-256 digests of the keys (:class:`KeyRing`): a key cannot leak from
  the replica's memory or config, and log records are scrubbed of ``Bearer`` tokens
  (:func:`install_log_redaction`) in case a library logs headers.
* WebSockets: the ``Authorization`` header, or (browsers cannot set headers) a first message
  ``{"type": "auth", "key": KEY}`` within :data:`WS_AUTH_TIMEOUT_S`; answered with
  ``{"type": "auth", "ok": true, "owner": ...}`` or a close with code 4401.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass, field

from fastapi import Depends, Header
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket

from . import schemas as S
from .errors import Unauthorized, Unprocessable

logger = logging.getLogger("serve.auth")
ENV_KEYS = "DNC_API_KEYS"
MIN_KEY_CHARS = 16
WS_AUTH_TIMEOUT_S = 5.0
WS_CLOSE_UNAUTHORIZED = 4401
WS_CLOSE_FORBIDDEN_ORIGIN = 4403
WS_CLOSE_TOO_MANY = 4429
_KEY_RE = re.compile(r"^[\x21-\x7e]+$")   # printable ASCII, no spaces
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s'\",]+")
_KEY_FIELD_RE = re.compile(r"(?i)(\"key\"\s*:\s*\")[^\"]*")


class KeyConfigError(ValueError):
    """A malformed key specification (the message is one line that says what to fix)."""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRing:
    """SHA-256 digest of each key -> its owner. Empty = keys off."""

    digests: dict[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    @property
    def owners(self) -> list[str]:
        return sorted(set(self.digests.values()))

    def owner_for(self, key: str | None) -> str | None:
        if not key:
            return None
        d = _digest(key)
        found = None
        for known, owner in self.digests.items():  # compare every digest: no early-exit timing
            if hmac.compare_digest(known, d):
                found = owner
        return found

    @classmethod
    def from_pairs(cls, pairs: dict[str, str]) -> "KeyRing":
        """``pairs``: key -> owner."""
        return cls({_digest(k): o for k, o in pairs.items()})


def parse_keys(spec: str, source: str = ENV_KEYS) -> dict[str, str]:
    """``"alice:KEY1,bob:KEY2"`` (commas or newlines; ``#`` comments) -> {key: owner}."""
    out: dict[str, str] = {}
    for n, raw in enumerate(re.split(r"[,\n]", spec), 1):
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        owner, sep, key = item.partition(":")
        owner, key = owner.strip(), key.strip()
        where = f"{source} entry {n}"
        if not sep or not owner or not key:
            raise KeyConfigError(f"{where}: expected owner:key")
        if not S.ID_RE.match(owner):
            raise KeyConfigError(f"{where}: owner must match {S.ID_PATTERN}")
        if len(key) < MIN_KEY_CHARS or not _KEY_RE.match(key):
            raise KeyConfigError(f"{where} (owner {owner}): a key must be at least {MIN_KEY_CHARS} printable "
                                 "characters without spaces; make one with "
                                 "python -c 'import secrets; print(secrets.token_urlsafe(24))'")
        if key in out and out[key] != owner:
            raise KeyConfigError(f"{where}: the same key is given to two owners")
        out[key] = owner
    return out


def load_key_ring(api_keys_file: str | None = None, env: dict[str, str] | None = None) -> KeyRing:
    """Keys from ``$DNC_API_KEYS`` and ``api_keys_file`` (fsspec path or URI) together."""
    env = os.environ if env is None else env
    pairs = parse_keys(env.get(ENV_KEYS, ""))
    if api_keys_file:
        import fsspec

        try:
            with fsspec.open(api_keys_file, "r") as f:
                text = f.read()
        except FileNotFoundError:
            raise KeyConfigError(f"api_keys_file {api_keys_file!r} does not exist") from None
        for key, owner in parse_keys(text, f"api_keys_file {api_keys_file}").items():
            if pairs.get(key, owner) != owner:
                raise KeyConfigError("the same key is given to two owners (DNC_API_KEYS and api_keys_file)")
            pairs[key] = owner
    return KeyRing.from_pairs(pairs)


# ------------------------------------------------------------------------------ bind rule
def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: KeyRing) -> str:
    """Refuse to serve beyond loopback without keys; returns the line to print at start."""
    if keys.enabled:
        return f"API keys on: {len(keys.digests)} key(s) for owner(s) {', '.join(keys.owners)}; HTTP on {host}"
    if not is_loopback(host):
        raise KeyConfigError(f"refusing to serve on {host} without API keys: set {ENV_KEYS}=owner:key,... or "
                             "api_keys_file, or bind 127.0.0.1")
    return (f"API keys off: serving on loopback {host} only; the owner is whatever X-Owner says "
            f"(set {ENV_KEYS} or api_keys_file to require keys)")


def serve_http_host(default: str = "127.0.0.1") -> str:
    """The host the running Serve proxies bind (``http_options.host``); ``default`` when no Serve
    instance runs yet (``serve.run`` then starts one on 127.0.0.1)."""
    try:
        import ray
        from ray.serve.context import _get_global_client  # Ray offers no public getter

        if not ray.is_initialized():  # asking would start a Ray cluster
            return default
        client = _get_global_client(raise_if_no_controller_running=False)
        if client is not None:
            return client.http_config.host or default
    except Exception:  # no Ray/Serve here: the default stands
        logger.debug("no running Serve controller to ask for its host", exc_info=True)
    return default


# ------------------------------------------------------------------------------ callers
@dataclass(frozen=True)
class Caller:
    """Who sent a request: ``key_owner`` with keys on, else the (unverified) ``X-Owner`` header."""

    key_owner: str | None = None
    header_owner: str | None = None

    def owner(self, claimed: str | None = None) -> str:
        """The owner a request acts as; ``claimed`` (a body ``owner``/``user``) counts only without keys."""
        if self.key_owner is not None:
            return self.key_owner
        owner = self.header_owner or claimed or "anonymous"
        try:
            return S.check_id(owner, "owner (X-Owner header)")
        except ValueError as e:
            raise Unprocessable(str(e), "invalid_owner", "owner") from None


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer KEY` "
                                                    "(required when the server has keys).")


def bearer_key(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None


async def caller(conn: HTTPConnection,
                 credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                 x_owner: str | None = Header(None, description="Session owner when the server has no API "
                                                                "keys (ignored with keys).")) -> Caller:
    """FastAPI dependency: the request's :class:`Caller`; 401 with keys on and no valid key."""
    keys: KeyRing = conn.app.state.ctx.keys
    if not keys.enabled:
        return Caller(header_owner=x_owner)
    owner = keys.owner_for(credentials.credentials if credentials else None)
    if owner is None:
        conn.app.state.ctx.count("rejected/auth")
        raise Unauthorized("missing or unknown API key: send Authorization: Bearer KEY", "invalid_api_key")
    return Caller(key_owner=owner)


# ------------------------------------------------------------------------------ origins
def origin_allowed(conn: HTTPConnection, allowed: list[str]) -> bool:
    """No Origin (not a browser), same origin as the request, or listed in ``allowed``."""
    origin = conn.headers.get("origin")
    if not origin or "*" in allowed or origin in allowed:
        return True
    host = conn.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


# ------------------------------------------------------------------------------ websockets
async def authenticate_ws(ws: WebSocket, keys: KeyRing, allowed_origins: list[str]) -> str | None:
    """Accept ``ws`` and return its owner, or close it (4403 origin, 4401 auth) and return None."""
    await ws.accept()
    if not origin_allowed(ws, allowed_origins):
        await ws.close(WS_CLOSE_FORBIDDEN_ORIGIN, "origin not allowed (allowed_origins)")
        return None
    if not keys.enabled:
        claimed = ws.headers.get("x-owner") or ws.query_params.get("owner")
        return claimed if claimed and S.ID_RE.match(claimed) else "anonymous"
    header = ws.headers.get("authorization")
    if header:
        owner = keys.owner_for(bearer_key(header))
        if owner is None:
            await ws.close(WS_CLOSE_UNAUTHORIZED, "unknown API key")
        return owner
    try:
        raw = await asyncio.wait_for(ws.receive_text(), WS_AUTH_TIMEOUT_S)
        msg = json.loads(raw)
        key = msg.get("key") if isinstance(msg, dict) and msg.get("type") == "auth" else None
    except asyncio.TimeoutError:
        await ws.close(WS_CLOSE_UNAUTHORIZED, f"send {{\"type\": \"auth\", \"key\": KEY}} within "
                                              f"{WS_AUTH_TIMEOUT_S:.0f} s, or an Authorization header")
        return None
    except Exception:  # not JSON, or the client left
        key = None
    owner = keys.owner_for(key if isinstance(key, str) else None)
    if owner is None:
        await _close_quietly(ws, WS_CLOSE_UNAUTHORIZED, "authentication required: first message "
                                                        "{\"type\": \"auth\", \"key\": KEY}")
        return None
    await ws.send_json({"type": "auth", "ok": True, "owner": owner})
    return owner


async def _close_quietly(ws: WebSocket, code: int, reason: str) -> None:
    try:
        await ws.close(code, reason)
    except RuntimeError:  # already closed by the client
        pass


# ------------------------------------------------------------------------------ logs
class RedactKeys(logging.Filter):
    """Scrub ``Bearer KEY`` and ``"key": "..."`` out of log records, whoever logs them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        clean = _KEY_FIELD_RE.sub(r"\1***", _BEARER_RE.sub(r"\1***", msg))
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def install_log_redaction() -> None:
    """Add :class:`RedactKeys` to the handlers of the root and Ray Serve loggers (idempotent)."""
    for name in ("", "ray", "ray.serve", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactKeys) for f in handler.filters):
                handler.addFilter(RedactKeys())
