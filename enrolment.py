"""Speakers by enrolment, as speaker-verification systems name them: each enrolled speaker is the
centroid of their segments' speaker vectors (what the model's speaker head reads, labels hidden),
a segment is scored by cosine against every centroid, and a best score below a calibrated
threshold reads as `unknown`.

The threshold is calibrated for an open set: each speaker's held-out segments give target scores
(against their own centroid, made without them) and impostor scores (the best against every
other centroid, as a speaker nobody enrolled would score); the threshold sits where the two
error rates are equal. New speakers are enrolled from a few labelled recordings, no retraining.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HELD_OUT_EVERY = 3   # every third segment of a speaker calibrates the threshold (speakers with 2+)


@dataclass
class Enrolment:
    speakers: list[str]
    centroids: np.ndarray      # (speakers, d) unit vectors, in the centred space
    mean: np.ndarray           # (d,) subtracted from every vector before normalising
    threshold: float           # a best cosine score below it: unknown
    counts: list[int] = field(default_factory=list)   # segments enrolled per speaker
    calibration: dict = field(default_factory=dict)   # equal error rate and trial counts

    def unit(self, vectors: np.ndarray) -> np.ndarray:
        centred = np.asarray(vectors, np.float64) - self.mean
        return centred / np.maximum(np.linalg.norm(centred, axis=-1, keepdims=True), 1e-12)

    def score(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> each vector's nearest speaker (index) and its cosine score."""
        scores = self.unit(vectors) @ self.centroids.T
        best = scores.argmax(-1)
        return best, scores[np.arange(len(best)), best]

    def state_dict(self) -> dict:
        return {"speakers": list(self.speakers), "centroids": self.centroids.tolist(), "mean": self.mean.tolist(),
                "threshold": float(self.threshold), "counts": list(self.counts), "calibration": dict(self.calibration)}

    @classmethod
    def from_state(cls, state: dict) -> "Enrolment":
        return cls(list(state["speakers"]), np.asarray(state["centroids"], np.float64),
                   np.asarray(state["mean"], np.float64), float(state["threshold"]), list(state.get("counts", [])),
                   dict(state.get("calibration", {})))


def _centroids(unit: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    sums = np.zeros((n, unit.shape[1]))
    np.add.at(sums, owner, unit)
    return sums / np.maximum(np.linalg.norm(sums, axis=-1, keepdims=True), 1e-12)


def equal_error_threshold(target: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """-> (threshold, equal error rate): the score where the share of targets below it is
    closest to the share of impostors at or above it; thresholds are taken halfway between
    neighbouring scores, the middle one of a tie (so a clean separation gets the middle of its
    gap, not its edge)."""
    scores = np.unique(np.concatenate([target, impostor]))
    candidates = np.concatenate([[scores[0] - 1e-6], (scores[1:] + scores[:-1]) / 2, [scores[-1] + 1e-6]])
    miss = (target[None, :] < candidates[:, None]).mean(1)
    false_alarm = (impostor[None, :] >= candidates[:, None]).mean(1)
    gap = np.abs(miss - false_alarm)
    ties = np.flatnonzero(gap == gap.min())
    best = ties[len(ties) // 2]
    return float(candidates[best]), float((miss[best] + false_alarm[best]) / 2)


def enrol(vectors: np.ndarray, names: list[str], previous: Enrolment | None = None) -> Enrolment:
    """Speakers from labelled segment vectors (one name per row). Alone: the threshold is
    calibrated on every speaker's held-out segments and the centroids are then made from all of
    them. Added to `previous`: its threshold and centring hold (they were calibrated on the
    training speakers), speakers named again are enrolled anew from these segments."""
    vectors = np.asarray(vectors, np.float64)
    order = list(dict.fromkeys(names))
    owner = np.array([order.index(name) for name in names])
    counts = np.bincount(owner, minlength=len(order))
    mean = vectors.mean(0) if previous is None else previous.mean
    unit = Enrolment(order, np.zeros((0, vectors.shape[1])), mean, 0.0).unit(vectors)
    centroids = _centroids(unit, owner, len(order))
    if previous is not None:
        kept = [i for i, name in enumerate(previous.speakers) if name not in order]
        return Enrolment(order + [previous.speakers[i] for i in kept],
                         np.vstack([centroids, previous.centroids[kept]]), mean, previous.threshold,
                         [int(c) for c in counts] + [previous.counts[i] for i in kept if i < len(previous.counts)],
                         previous.calibration)
    position = np.array([np.sum(owner[:i] == owner[i]) for i in range(len(owner))])
    held = (position % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) & (counts[owner] >= 2)
    threshold, calibration = -1.0, {}   # nothing to calibrate on: the nearest speaker is always named
    if held.any() and len(order) > 1:
        scores = unit[held] @ _centroids(unit[~held], owner[~held], len(order)).T
        own = owner[held]
        target = scores[np.arange(len(own)), own]
        scores[np.arange(len(own)), own] = -np.inf
        threshold, eer = equal_error_threshold(target, scores.max(-1))
        calibration = {"equal_error_rate": eer, "trials": int(len(own))}
    return Enrolment(order, centroids, mean, threshold, [int(c) for c in counts], calibration)
