"""Speakers by enrolment, as speaker-verification systems name them: each enrolled speaker is the
centroid of their segments' vectors (the mean of the encoder's output over a segment, labels
hidden: what `embed` writes), a segment is scored by cosine against every centroid, and a best
score below a calibrated threshold reads as `unknown`. (What the speaker head reads is shaped
to the training speakers: on bench/real_recordings.py it named unseen voices as one of them far
more often, 0.70 flagged against 1.00 on the same checkpoint.)

Before the cosine, vectors are whitened within speakers (WCCN: the directions in which one
speaker's segments vary, with what is said, weigh less than those that tell speakers apart), and
each speaker's scores are normalised by how their own held-out segments score (a speaker whose
segments all sound alike gets a tight range). The threshold sits at the equal-error point of
held-out segments scored against their own centroid (targets) and against the best other one
(as a speaker nobody enrolled would score), at the end of that range nearest the targets.
New speakers are enrolled from a few labelled recordings, no retraining.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HELD_OUT_EVERY = 3      # every third segment of a speaker calibrates (speakers with 2+ segments)
SHRINKAGE = 0.5         # within-speaker covariance pulled halfway to a scaled identity (few segments)
MIN_SPREAD = 0.02       # floor of a speaker's score spread (a few held-out segments can agree too well)
VECTORS = "segment-mean"   # what is enrolled: a segment's mean encoder output (earlier: the speaker head's input)


@dataclass
class Enrolment:
    speakers: list[str]
    centroids: np.ndarray      # (speakers, d) unit vectors in the whitened space
    mean: np.ndarray           # (d,) subtracted before whitening
    whitening: np.ndarray      # (d, d)
    typical: np.ndarray        # (speakers,) mean cosine of a speaker's held-out segments to their centroid
    spread: np.ndarray         # (speakers,) and its standard deviation
    threshold: float           # a best normalised score below it: unknown
    counts: list[int] = field(default_factory=list)   # segments enrolled per speaker
    calibration: dict = field(default_factory=dict)   # equal error rate and trials

    def unit(self, vectors: np.ndarray) -> np.ndarray:
        white = (np.asarray(vectors, np.float64) - self.mean) @ self.whitening
        return white / np.maximum(np.linalg.norm(white, axis=-1, keepdims=True), 1e-12)

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """(vectors, speakers): cosine to each centroid, in units of that speaker's spread from
        their typical score (0: as their own segments score; -2: two spreads below)."""
        return (self.unit(vectors) @ self.centroids.T - self.typical) / self.spread

    def score(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> each vector's best-scoring speaker (index) and that score."""
        scores = self.scores(vectors)
        best = scores.argmax(-1)
        return best, scores[np.arange(len(best)), best]

    def state_dict(self) -> dict:
        return {"vectors": VECTORS, "speakers": list(self.speakers), "centroids": self.centroids.tolist(), "mean": self.mean.tolist(),
                "whitening": self.whitening.tolist(), "typical": self.typical.tolist(), "spread": self.spread.tolist(),
                "threshold": float(self.threshold), "counts": list(self.counts), "calibration": dict(self.calibration)}

    @classmethod
    def from_state(cls, state: dict) -> "Enrolment":
        if state.get("vectors") != VECTORS:
            raise ValueError("its speakers were enrolled on other vectors by an earlier version of mmtrain: enrol "
                             "them again (model_trainer.py enroll --checkpoint C --manifest TRAINING_MANIFEST --out C2)")
        arrays = {key: np.asarray(state[key], np.float64) for key in ("centroids", "mean", "whitening", "typical",
                                                                       "spread")}
        return cls(list(state["speakers"]), threshold=float(state["threshold"]), counts=list(state.get("counts", [])),
                   calibration=dict(state.get("calibration", {})), **arrays)


def _centroids(unit: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    sums = np.zeros((n, unit.shape[1]))
    np.add.at(sums, owner, unit)
    return sums / np.maximum(np.linalg.norm(sums, axis=-1, keepdims=True), 1e-12)


def within_speaker_whitening(vectors: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """W^-1/2 of the within-speaker covariance W, shrunk towards a scaled identity."""
    centred = vectors - np.stack([vectors[owner == s].mean(0) for s in range(owner.max() + 1)])[owner]
    within = centred.T @ centred / len(vectors)
    within = (1 - SHRINKAGE) * within + SHRINKAGE * np.trace(within) / len(within) * np.eye(len(within))
    values, vectors_ = np.linalg.eigh(within)
    return vectors_ @ np.diag(np.maximum(values, 1e-12) ** -0.5) @ vectors_.T


def equal_error_threshold(target: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """-> (threshold, equal error rate): the score where the share of targets below it is
    closest to the share of impostors at or above it; thresholds are taken halfway between
    neighbouring scores, and of a tie the one nearest the targets (an unseen speaker scores
    closer to the targets than the enrolled speakers, whom the model learned to keep apart)."""
    scores = np.unique(np.concatenate([target, impostor]))
    candidates = np.concatenate([[scores[0] - 1e-6], (scores[1:] + scores[:-1]) / 2, [scores[-1] + 1e-6]])
    miss = (target[None, :] < candidates[:, None]).mean(1)
    false_alarm = (impostor[None, :] >= candidates[:, None]).mean(1)
    gap = np.abs(miss - false_alarm)
    best = np.flatnonzero(gap == gap.min())[-1]
    return float(candidates[best]), float((miss[best] + false_alarm[best]) / 2)


def _held_out(owner: np.ndarray, counts: np.ndarray) -> np.ndarray:
    position = np.array([np.sum(owner[:i] == owner[i]) for i in range(len(owner))])
    return (position % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) & (counts[owner] >= 2)


def _own_scores(unit: np.ndarray, owner: np.ndarray, held: np.ndarray, n: int) -> np.ndarray:
    """Held-out segments' cosines to every centroid made without them."""
    return unit[held] @ _centroids(unit[~held], owner[~held], n).T


def _spread_of(own: np.ndarray, owner: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per speaker: the mean and spread of their held-out targets (the median of the others' where
    a speaker has fewer than two)."""
    typical, spread = np.full(n, np.nan), np.full(n, np.nan)
    for s in range(n):
        mine = own[owner == s]
        if len(mine) >= 2:
            typical[s], spread[s] = mine.mean(), max(mine.std(), MIN_SPREAD)
    known = ~np.isnan(typical)
    typical[~known] = np.median(typical[known]) if known.any() else 1.0
    spread[~known] = np.median(spread[known]) if known.any() else 0.1
    return typical, spread


def enrol(vectors: np.ndarray, names: list[str], previous: Enrolment | None = None) -> Enrolment:
    """Speakers from labelled segment vectors (one name per row). Alone: whitening, each speaker's
    typical score and the threshold come from these, on every speaker's held-out segments, and
    the centroids then from all of them. Added to `previous`: its whitening and threshold hold
    (they were calibrated on the training speakers); speakers named again are enrolled anew."""
    vectors = np.asarray(vectors, np.float64)
    order = list(dict.fromkeys(names))
    owner = np.array([order.index(name) for name in names])
    counts = np.bincount(owner, minlength=len(order))
    held = _held_out(owner, counts)
    if previous is None:
        mean = vectors.mean(0)
        whitening = within_speaker_whitening(vectors - mean, owner)
    else:
        mean, whitening = previous.mean, previous.whitening
    base = Enrolment(order, np.zeros((0, len(mean))), mean, whitening, np.zeros(0), np.ones(0), 0.0)
    unit = base.unit(vectors)
    scores = _own_scores(unit, owner, held, len(order)) if held.any() else np.zeros((0, len(order)))
    own = scores[np.arange(held.sum()), owner[held]]
    typical, spread = _spread_of(own, owner[held], len(order))
    centroids = _centroids(unit, owner, len(order))
    if previous is not None:
        kept = [i for i, name in enumerate(previous.speakers) if name not in order]
        return Enrolment(order + [previous.speakers[i] for i in kept], np.vstack([centroids, previous.centroids[kept]]),
                         mean, whitening, np.concatenate([typical, previous.typical[kept]]),
                         np.concatenate([spread, previous.spread[kept]]), previous.threshold,
                         [int(c) for c in counts] + [previous.counts[i] for i in kept if i < len(previous.counts)],
                         previous.calibration)
    threshold, calibration = -np.inf, {}   # nothing to calibrate on: the best speaker is always named
    if held.any() and len(order) > 1:
        normalised = (scores - typical) / spread
        target = normalised[np.arange(len(own)), owner[held]]
        normalised[np.arange(len(own)), owner[held]] = -np.inf
        threshold, eer = equal_error_threshold(target, normalised.max(-1))
        calibration = {"equal_error_rate": eer, "trials": int(len(own))}
    return Enrolment(order, centroids, mean, whitening, typical, spread, threshold, [int(c) for c in counts],
                     calibration)
