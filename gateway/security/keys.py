"""API keys: the key file model, hashing, constant-time lookup, atomic writes.

A key is ``sk_`` + 256 random bits (``secrets.token_urlsafe(32)``). Only its SHA-256 hex digest
is stored. A plain, fast hash is enough here: slow password hashes (bcrypt, scrypt, argon2)
exist to make guessing *low-entropy* secrets expensive, but a 256-bit random key has no
dictionary to try, and 2**256 guesses stay out of reach however fast each one is.

Lookup hashes the presented key and finds the record by that digest in a dict, then compares
the digests with `hmac.compare_digest`. The dict's timing depends only on the digest of what
the caller sent, which the caller cannot steer towards a stored digest (that would need a
SHA-256 preimage), so it leaks nothing about any stored key.

The key file (YAML or JSON)::

    keys:
      - {id: ci-bot, sha256: <64 hex>, scopes: [predict, feedback], rate: 50, tenant: acme,
         created: "2026-01-01T00:00:00+00:00"}
    tenants:                      # optional: a shared rate per tenant
      acme: {rate: 200}
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KEY_PREFIX = "sk_"
SCOPES = ("predict", "feedback", "admin", "read")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class KeyFileError(ValueError):
    """The key file cannot be read or holds an invalid entry."""


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    sha256: str
    scopes: frozenset[str]
    #: Requests per second (GCRA emission rate); None: no per-key limit.
    rate: float | None = None
    #: Requests admitted at once from a full bucket; None: one second's worth (at least 1).
    burst: int | None = None
    tenant: str | None = None
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "sha256": self.sha256, "scopes": sorted(self.scopes)}
        for name in ("rate", "burst", "tenant"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.created:
            out["created"] = self.created
        return out


@dataclass(frozen=True, slots=True)
class TenantLimit:
    rate: float
    burst: int | None = None


def burst_of(rate: float, burst: int | None) -> int:
    return burst if burst is not None else max(1, math.ceil(rate))


@dataclass(frozen=True)
class KeyFile:
    keys: tuple[KeyRecord, ...] = ()
    tenants: Mapping[str, TenantLimit] = field(default_factory=dict)
    _by_hash: dict[str, KeyRecord] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = [k.id for k in self.keys]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise KeyFileError(f"duplicate key id(s) {dupes}")
        digests = [k.sha256 for k in self.keys]
        if len(set(digests)) != len(digests):
            raise KeyFileError("two entries hold the same key hash")
        # Index once per load: lookups are a dict probe, not a scan.
        object.__setattr__(self, "_by_hash", {k.sha256: k for k in self.keys})

    def lookup(self, presented: str) -> KeyRecord | None:
        # Keys are printable ASCII (sk_ + base64url): anything else is an unknown key, the
        # same 401 as any wrong one. Header bytes that are not UTF-8 reach us as lone
        # surrogates (aiohttp decodes with surrogateescape), which encode() refuses: a 500.
        if not (presented.isascii() and presented.isprintable()):
            return None
        digest = hash_key(presented)
        record = self._by_hash.get(digest)
        if record is None or not hmac.compare_digest(record.sha256, digest):
            return None
        return record

    def get(self, key_id: str) -> KeyRecord | None:
        return next((k for k in self.keys if k.id == key_id), None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"keys": [k.to_dict() for k in self.keys]}
        if self.tenants:
            out["tenants"] = {
                name: {"rate": t.rate, **({"burst": t.burst} if t.burst is not None else {})}
                for name, t in sorted(self.tenants.items())
            }
        return out


def parse_key_file(data: Any, where: str = "key file") -> KeyFile:
    if data is None:
        return KeyFile()
    if not isinstance(data, Mapping):
        raise KeyFileError(f"{where}: top level must be a mapping with 'keys'")
    unknown = set(data) - {"keys", "tenants"}
    if unknown:
        raise KeyFileError(f"{where}: unknown section(s) {sorted(unknown)}")
    raw_keys = data.get("keys") or []
    if not isinstance(raw_keys, list):
        raise KeyFileError(f"{where}: 'keys' must be a list")
    keys = tuple(_record(k, f"{where}: keys[{i}]") for i, k in enumerate(raw_keys))
    raw_tenants = data.get("tenants") or {}
    if not isinstance(raw_tenants, Mapping):
        raise KeyFileError(f"{where}: 'tenants' must be a mapping")
    tenants = {str(n): tenant_limit(t, f"{where}: tenants.{n}") for n, t in raw_tenants.items()}
    return KeyFile(keys, tenants)


def _record(raw: Any, where: str) -> KeyRecord:
    if not isinstance(raw, Mapping):
        raise KeyFileError(f"{where}: expected a mapping")
    unknown = set(raw) - {"id", "sha256", "scopes", "rate", "burst", "tenant", "created"}
    if unknown:
        raise KeyFileError(f"{where}: unknown field(s) {sorted(unknown)}")
    key_id, digest = raw.get("id"), raw.get("sha256")
    if not isinstance(key_id, str) or not ID_PATTERN.match(key_id):
        raise KeyFileError(f"{where}: id must match {ID_PATTERN.pattern}")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise KeyFileError(f"{where} ({key_id}): sha256 must be 64 lowercase hex digits")
    scopes = parse_scopes(raw.get("scopes"), f"{where} ({key_id})")
    tenant = raw.get("tenant")
    if tenant is not None and (not isinstance(tenant, str) or not ID_PATTERN.match(tenant)):
        raise KeyFileError(f"{where} ({key_id}): tenant must match {ID_PATTERN.pattern}")
    rate, burst = _rate(raw.get("rate"), raw.get("burst"), f"{where} ({key_id})")
    created = raw.get("created", "")
    return KeyRecord(key_id, digest, scopes, rate, burst, tenant, str(created or ""))


def parse_scopes(value: Any, where: str = "scopes") -> frozenset[str]:
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",") if s.strip()]
    if not isinstance(value, list | tuple) or not value:
        raise KeyFileError(f"{where}: scopes must be a non-empty list of {list(SCOPES)}")
    bad = sorted({str(s) for s in value} - set(SCOPES))
    if bad:
        raise KeyFileError(f"{where}: unknown scope(s) {bad}; known: {list(SCOPES)}")
    return frozenset(str(s) for s in value)


def tenant_limit(raw: Any, where: str) -> TenantLimit:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        raw = {"rate": raw}
    if not isinstance(raw, Mapping) or set(raw) - {"rate", "burst"} or "rate" not in raw:
        raise KeyFileError(f"{where}: expected {{rate: N, burst: M}}")
    rate, burst = _rate(raw["rate"], raw.get("burst"), where)
    assert rate is not None
    return TenantLimit(rate, burst)


def _rate(rate: Any, burst: Any, where: str) -> tuple[float | None, int | None]:
    if rate is None:
        if burst is not None:
            raise KeyFileError(f"{where}: burst needs a rate")
        return None, None
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < 1e9:
        raise KeyFileError(f"{where}: rate must be a positive number (requests per second)")
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
        raise KeyFileError(f"{where}: burst must be a positive integer")
    return float(rate), burst


def load_key_file(path: Path) -> KeyFile:
    """The key file at ``path``; a missing file holds no keys (everything gets 401)."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return KeyFile()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc}") from exc
    return parse_key_bytes(text, str(path))


def parse_key_bytes(text: bytes, where: str) -> KeyFile:
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise KeyFileError(f"{where}: not YAML/JSON: {exc}") from exc
    except RecursionError:  # PyYAML recurses per nesting level
        raise KeyFileError(f"{where}: nested too deeply") from None
    return parse_key_file(data, where)


def write_key_file(path: Path, keys: KeyFile) -> None:
    """Replace the file atomically: a reader (the gateway's reloader) sees the old file or the
    new one, never half of one. Temp file in the same directory, fsync, os.replace, then the
    directory is fsynced so the rename itself survives a crash. Mode 0600: hashes only, but
    a key file is still nobody else's business."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(keys.to_dict(), sort_keys=False).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
