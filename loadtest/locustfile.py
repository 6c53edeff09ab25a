"""Locust users for the gateway: steady predictions, batches, OIP infer, a canary mix, feedback.

Run a scenario headless (the gateway must be up, e.g. ``make run``):

    make loadtest SCENARIO=steady            # or ramp, spike, soak
    .venv/bin/locust --config loadtest/scenarios/steady.conf --host http://127.0.0.1:8080

Each scenario writes CSV and HTML reports under loadtest/reports/ and the run exits 1 when
the total p99 or the error rate is above ``--max-p99-ms`` / ``--max-error-rate``
(loadtest/thresholds.py). ``--stages until_s:users:spawn_rate,...`` shapes the load
(ramp, spike); without stages the run holds ``--users`` for ``--run-time``.
"""

from __future__ import annotations

import collections
import random
import sys
import uuid
from pathlib import Path
from typing import Any

from locust import FastHttpUser, LoadTestShape, constant_throughput, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from loadtest.thresholds import Thresholds, parse_stages, stage_at

FEATURES = 30
ENTITIES = 10_000  # canary users: enough distinct entities that a 10 % sticky split shows
JSON = {"Content-Type": "application/json"}

# Shared by the users of this process: recent request ids to send feedback for, and the
# answers the canary users saw per entity (a sticky split must never flip an entity).
_recent_ids: collections.deque[str] = collections.deque(maxlen=10_000)
_arms: collections.Counter[str] = collections.Counter()
_entity_version: dict[str, str] = {}
_flips = [0]


def _row(rng: random.Random) -> list[float]:
    return [round(rng.gauss(0.0, 1.0), 4) for _ in range(FEATURES)]


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--max-p99-ms", type=float, default=100.0, help="fail above this p99")
    parser.add_argument("--max-error-rate", type=float, default=0.001, help="fail above this")
    parser.add_argument("--stages", default="", help="until_s:users:spawn_rate,...")
    parser.add_argument("--user-rps", type=float, default=10.0, help="requests/s per user")


class _Base(FastHttpUser):
    abstract = True

    def wait_time(self) -> float:
        return constant_throughput(self.environment.parsed_options.user_rps)(self)

    def on_start(self) -> None:
        self.rng = random.Random()

    def _predict_body(self, entity: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "request_id": uuid.uuid4().hex,
            "model_name": "risk",
            "features": _row(self.rng),
        }
        if entity:
            body["entity_id"] = entity
        return body


class SteadyPredict(_Base):
    """One prediction per request through /v1/predict: the bulk of production traffic."""

    weight = 6

    @task
    def predict(self) -> None:
        body = self._predict_body(f"user-{self.rng.randrange(ENTITIES)}")
        with self.client.post(
            "/v1/predict", json=body, headers=JSON, name="/v1/predict", catch_response=True
        ) as r:
            if r.status_code == 200:
                _recent_ids.append(body["request_id"])
                r.success()
            else:
                r.failure(f"HTTP {r.status_code}: {r.text[:200] if r.text else ''}")


class BatchPredict(_Base):
    """16 predictions per request through /v1/predict:batch."""

    weight = 1

    @task
    def batch(self) -> None:
        reqs = [self._predict_body() for _ in range(16)]
        self.client.post("/v1/predict:batch", json=reqs, headers=JSON, name="/v1/predict:batch")


class OipInfer(_Base):
    """Open Inference Protocol JSON infer, as tritonclient.http sends it."""

    weight = 2

    @task
    def infer(self) -> None:
        body = {
            "inputs": [
                {"name": "features", "shape": [1, FEATURES], "datatype": "FP32",
                 "data": _row(self.rng)}
            ]
        }  # fmt: skip
        self.client.post("/v2/models/risk/infer", json=body, headers=JSON, name="/v2 infer")


class CanaryMix(_Base):
    """Predictions for many entities: the version mix shows the route's split, and an entity
    whose version flips between calls counts as a sticky violation (printed at the end)."""

    weight = 2

    @task
    def canary(self) -> None:
        entity = f"entity-{self.rng.randrange(ENTITIES)}"
        with self.client.post(
            "/v1/predict",
            json=self._predict_body(entity),
            headers=JSON,
            name="/v1/predict [canary]",
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
                return
            answer = r.json()
            if answer.get("fallback_used"):
                return  # a fallback answer says nothing about the split
            version = f"{answer.get('model_name')} v{answer.get('model_version')}"
            _arms[version] += 1
            seen = _entity_version.setdefault(entity, version)
            if seen != version:
                _flips[0] += 1
                _entity_version[entity] = version


class Feedback(_Base):
    """Labels for earlier predictions. A gateway without /v1/feedback (404) or without a label
    store (503 feedback_store_unavailable: Redis not configured) still passes, so the rest of
    the run is judged; the stats table shows these calls under their own name."""

    weight = 1

    @task
    def feedback(self) -> None:
        request_id = _recent_ids.popleft() if _recent_ids else uuid.uuid4().hex
        label = self.rng.choice(["approve", "deny", "review"])
        with self.client.post(
            "/v1/feedback",
            json={"request_id": request_id, "label": label},
            headers=JSON,
            name="/v1/feedback",
            catch_response=True,
        ) as r:
            if r.status_code in (200, 201, 202, 204, 404) or _no_label_store(r):
                r.success()
            else:
                r.failure(f"HTTP {r.status_code}")


def _no_label_store(r: Any) -> bool:
    if r.status_code != 503 or not r.text:
        return False
    return "feedback_store_unavailable" in r.text


class Scenario(LoadTestShape):
    """``--stages`` when given; otherwise ``--users`` at ``--spawn-rate`` for ``--run-time``."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        opts = self.runner.environment.parsed_options
        stages = parse_stages(opts.stages)
        now = self.get_run_time()
        if stages:
            stage = stage_at(stages, now)
            return None if stage is None else (stage.users, stage.spawn_rate)
        if opts.run_time and now >= opts.run_time:
            return None
        return opts.num_users or 1, opts.spawn_rate or 1


@events.quitting.add_listener
def _judge(environment: Any, **_: Any) -> None:
    opts = environment.parsed_options
    total = environment.stats.total
    p99 = total.get_response_time_percentile(0.99) or 0.0
    if _arms:
        mix = ", ".join(f"{k}: {v / sum(_arms.values()):.1%}" for k, v in sorted(_arms.items()))
        print(f"canary mix: {mix}; sticky flips: {_flips[0]}")
    reasons = Thresholds(opts.max_p99_ms, opts.max_error_rate).check(
        total.num_requests, total.num_failures, p99
    )
    if reasons:
        print("THRESHOLDS FAILED: " + "; ".join(reasons))
        environment.process_exit_code = 1
    else:
        print(
            f"thresholds ok: {total.num_requests} requests, p99 {p99:.0f} ms, "
            f"errors {total.fail_ratio:.3%}"
        )
