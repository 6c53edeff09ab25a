"""Sampled live histograms per (model, version) over a sliding window, and their PSI.

The hot path calls `observe` once per answer: with probability `sample_rate` the row is kept
(a reference appended to a list, about a microsecond). Kept rows are binned in bulk, one
vectorised comparison of all of them with the training edges and one `bincount`, when their
time bucket closes, when `max_pending` rows wait, or before a snapshot: each sampled row is
still one histogram update, in the bucket it arrived in, without a numpy call per request.
A ring of `window_s / bucket_s` slots makes the window slide: a slot is zeroed when the
clock comes round to it again. `snapshot` sums the slots still inside the window and
computes the population stability index per feature (and for the score, when the manifest
has a score reference):

    PSI = sum over bins of (live share - training share) * ln(live share / training share)

with shares floored at `EPS` so that an empty bin gives a large but finite term.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gateway.clock import Clock, monotonic
from gateway.drift.reference import Reference

EPS = 1e-4


@dataclass(frozen=True, slots=True)
class DriftPolicy:
    #: Share of answers whose row is counted (1.0: every row).
    sample_rate: float = 0.1
    #: The sliding window PSI is computed over, in seconds ...
    window_s: float = 600.0
    #: ... made of ring slots of this width (the window moves by one slot at a time).
    bucket_s: float = 10.0
    #: Rows a window needs before its PSI is exported (fewer: too noisy to alert on).
    min_rows: int = 100
    #: Seconds between two exports of the gauges (the background task).
    update_interval_s: float = 5.0
    #: Kept rows binned at once at the latest (they are also binned when their bucket ends).
    max_pending: int = 1024

    def __post_init__(self) -> None:
        if not 0 <= self.sample_rate <= 1 or self.bucket_s <= 0 or self.window_s < self.bucket_s:
            raise ValueError("drift: 0 <= sample_rate <= 1 and window_s >= bucket_s > 0")


@dataclass(frozen=True, slots=True)
class DriftReading:
    model: str
    version: str
    rows: int
    features: dict[str, float]  # feature -> PSI
    score: float | None  # None: no score reference in the manifest, or no scores seen


@dataclass(slots=True)
class _Live:
    ref: Reference
    counts: np.ndarray  # (slots, n_features, width)
    scores: np.ndarray  # (slots, score_bins)
    stamps: np.ndarray  # (slots,): the bucket number each slot holds, -1 empty
    rows: list[np.ndarray] = field(default_factory=list)  # kept, not yet binned: (k, n) each
    row_scores: list[float] = field(default_factory=list)  # NaN: no score for that row
    pending: int = 0  # rows in `rows`
    bucket: int = -1  # the time bucket the kept rows arrived in
    offsets: np.ndarray = field(init=False)  # flat index of each feature's first bin
    used: np.ndarray = field(init=False)  # (n_features, width): real bins, not padding

    def __post_init__(self) -> None:
        n, width = self.ref.expected.shape
        self.offsets = np.arange(n) * width
        self.used = np.arange(width)[None, :] < self.ref.nbins[:, None]


class DriftTracker:
    def __init__(
        self,
        policy: DriftPolicy,
        references: Callable[[str, str], Reference | None],
        clock: Clock = monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.references = references  # (model, version) -> Reference; called once per key
        self.clock = clock
        self.rand = (rng or random.Random()).random
        self._slots = max(1, round(policy.window_s / policy.bucket_s))
        self._live: dict[tuple[str, str], _Live | None] = {}

    def observe(self, model: str, version: str, row: np.ndarray, score: float | None) -> None:
        """Keep one answer's input row (and score) with probability sample_rate."""
        rate = self.policy.sample_rate
        if rate < 1.0 and self.rand() >= rate:
            return
        live = self._get(model, version)
        if live is None or row.size != len(live.ref.features):
            return
        self._keep(live, row.reshape(1, -1), [math.nan if score is None else score])

    def observe_rows(
        self, model: str, version: str, rows: np.ndarray, scores: np.ndarray | None
    ) -> None:
        """A batch (a /v2 tensor): each row is sampled on its own."""
        if len(rows) == 1:  # one row (most /v2 calls): one draw first, like observe()
            score = None if scores is None or len(scores) != 1 else float(scores[0])
            self.observe(model, version, rows[0], score)
            return
        live = self._get(model, version)
        if live is None or len(rows) == 0:
            return
        rows = rows.reshape(len(rows), -1)
        if rows.shape[1] != len(live.ref.features):
            return
        rate = self.policy.sample_rate
        keep = np.arange(len(rows))
        if rate < 1.0:
            keep = keep[[self.rand() < rate for _ in range(len(rows))]]
            if len(keep) == 0:
                return
        s = [math.nan] * len(keep)
        if scores is not None and len(scores) == len(rows):
            s = [float(v) for v in scores[keep]]
        self._keep(live, rows[keep], s)

    def _keep(self, live: _Live, rows: np.ndarray, scores: list[float]) -> None:
        bucket = self._bucket()
        if live.pending and live.bucket != bucket:  # the bucket closed: bin what it holds
            self._flush(live)
        live.bucket = bucket
        live.rows.append(rows)
        live.row_scores += scores
        live.pending += len(rows)
        if live.pending >= self.policy.max_pending:
            self._flush(live)

    def _flush(self, live: _Live) -> None:
        """Bin the kept rows into their bucket's slot: one histogram update per row."""
        if not live.pending:
            return
        rows = np.concatenate(live.rows)
        scores = np.asarray(live.row_scores, dtype=np.float64)
        live.rows, live.row_scores, live.pending = [], [], 0
        bucket = live.bucket
        if bucket <= self._bucket() - self._slots:
            return  # it has already left the window
        slot = bucket % self._slots
        if live.stamps[slot] != bucket:  # the ring came round: this slot's data left the window
            live.counts[slot] = 0
            live.scores[slot] = 0
            live.stamps[slot] = bucket
        ref = live.ref
        # bin = number of inner edges <= the value (np.searchsorted side="right", per feature)
        bins = (rows[:, :, None] >= ref.inner[None, :, :]).sum(axis=2) + live.offsets
        size = live.counts[slot].size
        live.counts[slot] += np.bincount(bins.ravel(), minlength=size).reshape(ref.expected.shape)
        if ref.score_inner is not None:
            scores = scores[~np.isnan(scores)]
            sb = np.searchsorted(ref.score_inner, scores, side="right")
            live.scores[slot] += np.bincount(sb, minlength=live.scores.shape[1])

    def snapshot(self) -> list[DriftReading]:
        """PSI of every tracked version whose window holds at least min_rows rows."""
        out = []
        for (model, version), live in self._live.items():
            if live is None:
                continue
            self._flush(live)
            valid = live.stamps > self._bucket() - self._slots
            counts = live.counts[valid].sum(axis=0)  # (n_features, width)
            rows = int(counts[0].sum()) if len(counts) else 0
            if rows < self.policy.min_rows:
                continue
            psi = _psi(counts, live.ref.expected, live.used)
            score = None
            if live.ref.score_expected is not None:
                s = live.scores[valid].sum(axis=0)
                if s.sum() >= self.policy.min_rows:
                    e = live.ref.score_expected[None, :]
                    score = float(_psi(s[None, :], e, np.ones_like(e, dtype=bool))[0])
            features = {n: float(v) for n, v in zip(live.ref.features, psi, strict=True)}
            out.append(DriftReading(model, version, rows, features, score))
        return out

    def _get(self, model: str, version: str) -> _Live | None:
        key = (model, version)
        if key in self._live:
            return self._live[key]
        ref = self.references(model, version)
        live = None
        if ref is not None:
            n_sb = 0 if ref.score_expected is None else len(ref.score_expected)
            live = _Live(
                ref,
                np.zeros((self._slots, *ref.expected.shape), dtype=np.int64),
                np.zeros((self._slots, n_sb), dtype=np.int64),
                np.full(self._slots, -1, dtype=np.int64),
            )
        self._live[key] = live  # a version without histograms is remembered as untracked
        return live

    def _bucket(self) -> int:
        return int(self.clock() // self.policy.bucket_s)


def _psi(counts: np.ndarray, expected: np.ndarray, used: np.ndarray) -> np.ndarray:
    """PSI per row of `counts` (live counts per bin) against `expected` (training shares);
    `used` masks the padding of features with fewer bins."""
    total = counts.sum(axis=1, keepdims=True)
    actual = np.where(total > 0, counts / np.maximum(total, 1), 0.0)
    a = np.maximum(actual, EPS)
    e = np.maximum(expected, EPS)
    return np.where(used, (a - e) * np.log(a / e), 0.0).sum(axis=1)


def psi(actual_counts: np.ndarray, expected_counts: np.ndarray) -> float:
    """PSI of one histogram against another (counts, same bins): for tests and reports."""
    e = np.asarray(expected_counts, dtype=np.float64)[None, :]
    a = np.asarray(actual_counts, dtype=np.float64)[None, :]
    return float(_psi(a, e / e.sum(), np.ones_like(e, dtype=bool))[0])
