"""Sticky buckets keyed by a deployment secret: without it, anyone can compute which entity
ids land in the challenger (the salt is the public route name); with it, they cannot."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gateway.api.admin import RELOADER
from gateway.api.keys import SERVICE
from gateway.app import build_app
from gateway.config import ConfigError, load_settings
from gateway.routing.split import bucket_of
from gateway.routing.table import Route, parse_route
from tests.unit.fakes import toy_backend, write_repo

ROUTE = (
    'model: risk\nchampion: {target: risk, version: "2"}\n'
    'challengers:\n  - {target: risk, version: "3", weight: 10, sticky: entity_id}\n'
)
N = 20_000


def challenger_ids(route: Route, ids: list[str]) -> set[str]:
    rng = random.Random(0)
    return {e for e in ids if route.choose(e, {}, rng)[1] != "champion"}


def attacker_guess(ids: list[str]) -> set[str]:
    """What a client computes from the public route name: buckets at the top 10 %."""
    return {e for e in ids if bucket_of(e, "risk") >= 9_000}


def test_without_a_secret_a_client_can_pick_the_challenger() -> None:
    ids = [f"user-{i}" for i in range(N)]
    assert attacker_guess(ids) == challenger_ids(parse_route(ROUTE.encode(), "risk.yaml"), ids)


def test_a_secret_makes_the_arm_unguessable_but_still_sticky_and_proportional() -> None:
    ids = [f"user-{i}" for i in range(N)]
    keyed = parse_route(ROUTE.encode(), "risk.yaml", sticky_secret="s3cret")
    chosen = challenger_ids(keyed, ids)
    guess = attacker_guess(ids)
    assert abs(len(chosen) - N * 0.1) < 5 * (N * 0.1 * 0.9) ** 0.5  # still 10 %
    hit_rate = len(guess & chosen) / len(guess)
    assert hit_rate < 0.2  # about 10 %: a guess is no better than chance
    again = parse_route(ROUTE.encode(), "other.yaml", sticky_secret="s3cret")
    assert challenger_ids(again, ids) == chosen  # same secret: same arm on every replica
    other = parse_route(ROUTE.encode(), "risk.yaml", sticky_secret="another")
    assert challenger_ids(other, ids) != chosen


async def test_the_app_keys_live_and_reloaded_tables_from_env_or_file(tmp_path: Path) -> None:
    base = write_repo(tmp_path)
    secret_file = tmp_path / "sticky.secret"
    secret_file.write_text("from-a-file\n")
    dirs = {
        "routing_model_repository": str(base.routing.model_repository),
        "routing_routes_dir": str(base.routing.routes_dir),
        "predlog_spool_dir": str(tmp_path / "spool"),
    }
    for env in (
        {"SWITCHYARD__ROUTING__STICKY_SALT": "from-env"},
        {"SWITCHYARD__ROUTING__STICKY_SALT_FILE": str(secret_file)},
    ):
        settings = load_settings(None, env=env, base_dir=tmp_path, **dirs)
        app = build_app(settings, backend=toy_backend())
        secret = "from-env" if "SWITCHYARD__ROUTING__STICKY_SALT" in env else "from-a-file"
        assert app[RELOADER].sticky_secret == secret
        route = (base.routing.routes_dir / "toy.yaml").read_text()
        route += 'challengers:\n  - {target: toy, version: "1", weight: 50, sticky: entity_id}\n'
        (base.routing.routes_dir / "toy.yaml").write_text(route)
        result = await app[RELOADER].reload()
        assert result.result == "ok", result.error
        split = app[SERVICE].routes.current.get("toy").split
        assert split is not None and split.salt not in ("toy", "")
        (base.routing.routes_dir / "toy.yaml").write_text(route.split("challengers:")[0])
    env = {"SWITCHYARD__ROUTING__STICKY_SALT_FILE": str(tmp_path / "nonexistent")}
    missing = load_settings(None, env=env, base_dir=tmp_path, **dirs)
    with pytest.raises(ConfigError, match="sticky_salt_file"):
        build_app(missing, backend=toy_backend())
