"""Property tests for the two loaders that read operator-written files at run time: a route
file (routing/table.py parse_route) and the key file (security/keys.py parse_key_bytes).
Whatever the bytes, each returns a valid value or raises its own error (RouteError,
KeyFileError), which the reloaders report; any other exception would kill a reload loop."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.routing.table import Route, RouteError, parse_route
from gateway.security.keys import SCOPES, KeyFile, KeyFileError, parse_key_bytes
from gateway.types import Target

# Bounded: the four tests together take a few seconds on a loaded 2-core machine.
LAUGHS = b"a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + b"".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n".encode() for i in range(1, 9)
)
PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=12,
)  # fmt: skip


def maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(value, value, anything)


target = st.fixed_dictionaries(
    {"target": maybe(st.sampled_from(["risk", "toy", ""])),
     "version": maybe(st.sampled_from(["1", "2", 3, ""]))},
    optional={"weight": maybe(st.floats(-10, 200)), "sticky": maybe(st.just("entity_id")),
              "sample": maybe(st.floats(-1, 2)), "match": maybe(st.dictionaries(
                  st.sampled_from(["segment", "channel"]), st.text(max_size=4), max_size=2))},
)  # fmt: skip
route_docs = st.fixed_dictionaries(
    {"model": maybe(st.sampled_from(["risk", "toy"])), "champion": maybe(target)},
    optional={
        "challengers": maybe(st.lists(target, max_size=3)),
        "segments": maybe(st.lists(target, max_size=2)),
        "shadow": maybe(st.lists(target, max_size=2)),
        "fallback": maybe(st.fixed_dictionaries({}, optional={
            "target": st.sampled_from(["risk_distilled", ""]), "version": st.just("1"),
            "cache_ttl_s": maybe(st.floats(-1, 1e4)), "default": maybe(st.dictionaries(
                st.sampled_from(["score", "decision"]), scalars, max_size=2))})),
        "slo": maybe(st.fixed_dictionaries({}, optional={
            "p99_ms": maybe(st.floats(-1, 1e4)), "error_rate": maybe(st.floats(-1, 2)),
            "deadline_ms": maybe(st.integers(-5, 10**6))})),
        "cache": maybe(st.fixed_dictionaries({}, optional={"ttl_s": maybe(st.floats(-1, 1e4))})),
        "bogus": anything,
    },
)  # fmt: skip


def check_route(content: bytes) -> None:
    try:
        route = parse_route(content, "r.yaml")
    except RouteError as exc:
        assert str(exc).startswith("r.yaml")  # names the file (and line) for the operator
        return
    assert isinstance(route, Route) and isinstance(route.champion, Target)
    assert route.name and route.policy_version.startswith("routes@")
    if route.split is not None:
        weights = route.split.weights()
        assert abs(sum(weights.values()) - 100) < 1e-6 and min(weights.values()) >= 0


@PROPS
@given(st.binary(max_size=300))
@example(b"[" * 600)  # nesting past the parser's recursion limit
@example(b"{a: " * 600)
@example(b"\xff\xfe\x00")  # not UTF-8
@example(b"model: !!python/object:os.system x\nchampion: {target: a, version: 1}")
@example(b"&a [*a]")  # an alias that holds itself
@example(LAUGHS)  # aliases of aliases: 9**8 nodes if expanded
def test_any_bytes_give_a_route_or_a_route_error(content: bytes) -> None:
    check_route(content)


@PROPS
@given(route_docs)
def test_any_route_document_gives_a_route_or_a_route_error(doc: dict[str, Any]) -> None:
    check_route(yaml.safe_dump(doc).encode())


key_record = st.fixed_dictionaries(
    {"id": maybe(st.sampled_from(["ci", "ops", "bad id", ""])),
     "sha256": maybe(st.sampled_from(["0" * 64, "a" * 64, "A" * 64, "0" * 63]))},
    optional={"scopes": maybe(st.lists(st.sampled_from([*SCOPES, "root"]), max_size=4)),
              "rate": maybe(st.floats(-1, 1e5)), "burst": maybe(st.integers(-1, 10**6)),
              "tenant": maybe(st.sampled_from(["acme", "bad tenant"])),
              "created": anything, "bogus": anything},
)  # fmt: skip
key_docs = st.fixed_dictionaries(
    {"keys": maybe(st.lists(key_record, max_size=3))},
    optional={"tenants": maybe(st.dictionaries(st.sampled_from(["acme", "x y"]),
                                               maybe(st.floats(0, 1e4)), max_size=2)),
              "extra": anything},
)  # fmt: skip


def check_keys(content: bytes) -> None:
    try:
        keys = parse_key_bytes(content, "keys.yaml")
    except KeyFileError as exc:
        assert str(exc).startswith(("keys.yaml", "duplicate", "two entries"))
        return
    assert isinstance(keys, KeyFile)
    for record in keys.keys:
        assert record.scopes and record.scopes <= set(SCOPES)
        assert len(record.sha256) == 64


@PROPS
@given(st.binary(max_size=300))
@example(b"[" * 600)
@example(b"keys: " + b"[" * 600)
@example(b"&a [*a]")
@example(b"\xff\xfe\x00")
@example(b"keys: [{id: a, sha256: '" + b"0" * 64 + b"', scopes: [predict], rate: .nan}]")
def test_any_bytes_give_a_key_file_or_a_key_file_error(content: bytes) -> None:
    check_keys(content)


@PROPS
@given(key_docs)
def test_any_key_document_gives_a_key_file_or_a_key_file_error(doc: dict[str, Any]) -> None:
    check_keys(yaml.safe_dump(doc).encode())
