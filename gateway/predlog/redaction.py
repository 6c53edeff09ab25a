"""PII redaction and payload sampling, applied before an entry leaves the process.

A `LogPolicy` per public model names fields to hash (keyed blake2b, so joins on the hashed
value still work but low-entropy ids cannot be brute-forced without the salt) and fields to
remove. Names match top-level entry fields (`entity_id`), feature names and context keys of
the sampled payload. Fields in `hash_always` (settings: `entity_id`) are hashed for every
model, and a sampled payload's free-form `context` keeps only the keys of `context_allow`.
Shadow comparisons and structured logs should pass through `apply` too.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: Fields the log cannot lose: they identify and join the entry.
PROTECTED = frozenset({"request_id", "model", "version", "policy_version", "ts"})


class PolicyError(ValueError):
    """A redaction policy in the settings that cannot be used."""


@dataclass(frozen=True, slots=True)
class LogPolicy:
    hash_fields: frozenset[str] = frozenset()
    drop_fields: frozenset[str] = frozenset()
    sample_rate: float = 0.0
    salt: bytes = b""
    #: Context keys a sampled payload keeps; None keeps them all.
    context_allow: frozenset[str] | None = None

    @property
    def redacts(self) -> bool:
        return bool(self.hash_fields)

    def hash_value(self, value: Any) -> str:
        h = hashlib.blake2b(str(value).encode(), digest_size=16, key=self.salt[:64])
        return "h:" + h.hexdigest()

    def sampled(self, rand: Callable[[], float]) -> bool:
        return self.sample_rate > 0 and rand() < self.sample_rate

    def apply(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of `entry` with hashed and dropped fields, also inside `payload`."""
        out = self._redact(entry)
        payload = out.get("payload")
        if isinstance(payload, Mapping):
            allow = self.context_allow
            redacted = {}
            for k, v in payload.items():
                if k == "context" and allow is not None and isinstance(v, Mapping):
                    v = {ck: cv for ck, cv in v.items() if ck in allow}  # free text stays out
                redacted[k] = self._redact(v) if isinstance(v, Mapping) else v
            out["payload"] = redacted
        return out

    def _redact(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        # Copy, then touch only the named fields (a policy names a few): same keys, same
        # order as a filtered copy, at about half the cost per prediction-log entry.
        out = dict(fields)
        for k in self.drop_fields:
            out.pop(k, None)
        for k in self.hash_fields:
            v = out.get(k)
            if v is not None:
                out[k] = self.hash_value(v)
        return out


@dataclass(frozen=True, slots=True)
class LogPolicies:
    default: LogPolicy
    per_model: Mapping[str, LogPolicy]
    rand: Callable[[], float] = random.random

    def for_model(self, model: str) -> LogPolicy:
        return self.per_model.get(model, self.default)

    @property
    def redacts(self) -> bool:
        """Whether any field of any model is hashed (then the salt must be a secret)."""
        return self.default.redacts or any(p.redacts for p in self.per_model.values())

    @classmethod
    def from_settings(
        cls,
        policies: Mapping[str, Any],
        sample_rate: float = 0.0,
        salt: str = "",
        rand: Callable[[], float] = random.random,
        hash_always: Iterable[str] = (),
        context_allow: Iterable[str] | None = None,
    ) -> LogPolicies:
        key = salt.encode()
        always = frozenset(hash_always)
        if PROTECTED & always:
            raise PolicyError(f"predlog.hash_always: cannot redact {sorted(PROTECTED & always)}")
        allow = None if context_allow is None else frozenset(context_allow)
        default = LogPolicy(
            hash_fields=always,
            sample_rate=_rate(sample_rate, "predlog.sample_rate"),
            salt=key,
            context_allow=allow,
        )
        per_model = {}
        for model, spec in (policies or {}).items():
            where = f"predlog.policies.{model}"
            if not isinstance(spec, Mapping):
                raise PolicyError(f"{where}: expected {{hash: [...], drop: [...]}}")
            unknown = set(spec) - {"hash", "drop", "sample_rate"}
            if unknown:
                raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}")
            hashed, dropped = _names(spec.get("hash"), where), _names(spec.get("drop"), where)
            protected = PROTECTED & (hashed | dropped)
            if protected:
                raise PolicyError(f"{where}: cannot redact {sorted(protected)}")
            per_model[str(model)] = LogPolicy(
                hash_fields=(hashed | always) - dropped,
                drop_fields=dropped,
                sample_rate=_rate(spec.get("sample_rate", sample_rate), where),
                salt=key,
                context_allow=allow,
            )
        return cls(default, per_model, rand)


def _names(value: Any, where: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where}: field lists must be lists of names")
    return frozenset(value)


def _rate(value: Any, where: str) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise PolicyError(f"{where}: sample_rate must be a number") from None
    if not 0.0 <= rate <= 1.0:
        raise PolicyError(f"{where}: sample_rate must be in [0, 1]")
    return rate
