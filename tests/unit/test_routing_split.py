"""Splits: proportions, stickiness across instances and processes, minimal movement, segments."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from gateway.routing.split import BUCKETS, bucket_of
from gateway.routing.table import Route, Target, parse_route

N = 100_000


def route(challengers: str = "", extra: str = "") -> Route:
    text = 'model: risk\nchampion: {target: risk, version: "2"}\n'
    if challengers:
        text += "challengers:\n" + challengers
    return parse_route((text + extra).encode(), "risk.yaml")


def sticky(weight: float, version: str = "1") -> str:
    return f'  - {{target: risk, version: "{version}", weight: {weight}, sticky: entity_id}}\n'


def arms(r: Route, n: int = N) -> list[str]:
    rng = random.Random(0)
    return [r.choose(f"user-{i}", {}, rng)[1] for i in range(n)]


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * (n * p * (1 - p)) ** 0.5


def test_sticky_proportions_over_100k_entities() -> None:
    r = route(sticky(10) + sticky(25, "3"))
    got = arms(r)
    assert within(got.count("challenger:risk@1"), N, 0.10)
    assert within(got.count("challenger:risk@3"), N, 0.25)
    assert within(got.count("champion"), N, 0.65)


def test_random_split_uses_the_injected_rng() -> None:
    r = route("  - {target: risk, version: '1', weight: 30}\n")
    a = [r.choose(None, {}, random.Random(7))[1] for _ in range(5)]
    assert len(set(a)) == 1  # same seed, same draw
    rng = random.Random(1)
    got = [r.choose("same-entity", {}, rng)[1] for _ in range(N)]
    assert within(got.count("challenger:risk@1"), N, 0.30)  # not sticky: the entity varies


def test_sticky_is_the_same_on_two_instances() -> None:
    a, b = route(sticky(10)), route(sticky(10))
    assert arms(a, 20_000) == arms(b, 20_000)


def test_sticky_buckets_survive_a_restart() -> None:
    """A fresh interpreter (another hash seed) computes the same buckets."""
    keys = [f"user-{i}" for i in range(200)]
    code = (
        "from gateway.routing.split import bucket_of;"
        f"print(','.join(str(bucket_of(k, 'risk')) for k in {keys!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PYTHONPATH": "."},
    ).stdout.strip()
    assert out == ",".join(str(bucket_of(k, "risk")) for k in keys)


def test_sticky_without_the_key_goes_to_the_champion() -> None:
    r = route(sticky(50))
    rng = random.Random(3)
    assert {r.choose(None, {}, rng)[1] for _ in range(200)} == {"champion"}


def test_weight_change_moves_only_the_changed_slice() -> None:
    before, after = arms(route(sticky(10))), arms(route(sticky(25)))
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert set(moved) == {("champion", "challenger:risk@1")}  # nobody leaves the challenger
    assert within(len(moved), N, 0.15)


def test_adding_a_challenger_takes_from_the_champion_only() -> None:
    before = arms(route(sticky(10)))
    after = arms(route(sticky(10) + sticky(5, "3")))
    moved = {(x, y) for x, y in zip(before, after, strict=True) if x != y}
    assert moved == {("champion", "challenger:risk@3")}


def test_full_weight_sends_everyone_to_the_challenger() -> None:
    assert set(arms(route(sticky(100)), 5000)) == {"challenger:risk@1"}
    assert set(arms(route(sticky(0)), 5000)) == {"champion"}


def test_buckets_are_in_range_and_salted_per_route() -> None:
    keys = [f"user-{i}" for i in range(1000)]
    assert all(0 <= bucket_of(k, "risk") < BUCKETS for k in keys)
    assert [bucket_of(k, "risk") for k in keys] != [bucket_of(k, "digits") for k in keys]


SEGMENTS = """segments:
  - {name: eu, match: {segment: eu}, target: risk, version: "3"}
  - {match: {segment: [eu, us], channel: web}, target: risk, version: "4"}
  - {name: web, match: {channel: web}, target: risk_distilled, version: "1"}
"""


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        ({"segment": "eu", "channel": "web"}, ("risk@3", "segment:eu")),  # first match wins
        ({"segment": "us", "channel": "web"}, ("risk@4", "segment:1")),  # every field matches
        ({"segment": "us", "channel": "app"}, None),  # no segment: the split decides
        ({"channel": "web"}, ("risk_distilled@1", "segment:web")),
    ],
)
def test_segments_take_precedence_in_file_order(context: dict, expected: tuple | None) -> None:
    r = route(sticky(100), SEGMENTS)
    target, arm = r.choose("user-1", context, random.Random(0))
    if expected is None:
        assert (str(target), arm) == ("risk@1", "challenger:risk@1")
    else:
        assert (str(target), arm) == expected


def test_targets_lists_every_reachable_version() -> None:
    r = route(sticky(10), SEGMENTS + "shadow:\n  - {target: risk, version: '5', sample: 0.2}\n")
    assert {str(t) for t in r.targets()} == {
        "risk@2",
        "risk@1",
        "risk@3",
        "risk@4",
        "risk_distilled@1",
        "risk@5",
    }
    assert r.shadows[0].sample == 0.2 and r.shadows[0].target == Target("risk", "5")
