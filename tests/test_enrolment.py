"""Speakers by enrolment: centroids, an open-set threshold at the equal-error point, new speakers."""
import numpy as np
import pytest

from enrolment import Enrolment, enrol, equal_error_threshold


def test_the_threshold_sits_where_misses_and_false_alarms_are_equal():
    threshold, eer = equal_error_threshold(np.array([0.9, 0.8, 0.7, 0.2]), np.array([0.1, 0.3, 0.75, 0.0]))
    assert threshold == pytest.approx(0.5) and eer == pytest.approx(0.25)   # one target below, one impostor above
    threshold, eer = equal_error_threshold(np.array([0.9, 0.8]), np.array([0.1, 0.2]))
    assert threshold == pytest.approx(0.5) and eer == 0.0   # the middle of the gap


def clusters(rng, centres, per_speaker, spread=0.35):
    vectors = np.concatenate([c + spread * rng.normal(size=(per_speaker, len(c))) for c in centres])
    names = [f"s{i}" for i in range(len(centres)) for _ in range(per_speaker)]
    return vectors, names


def test_known_speakers_are_named_and_a_speaker_nobody_enrolled_reads_as_unknown():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 24))
    vectors, names = clusters(rng, centres[:5], 12)
    enrolment = enrol(vectors, names)
    assert enrolment.speakers == [f"s{i}" for i in range(5)] and enrolment.counts == [12] * 5
    assert enrolment.calibration["trials"] == 5 * 4   # every third segment of each speaker held out
    known, _ = clusters(np.random.default_rng(1), centres[:5], 10)
    nearest, scores = enrolment.score(known)
    truth = np.repeat(np.arange(5), 10)
    assert np.mean(nearest == truth) > 0.95 and np.mean(scores < enrolment.threshold) <= 0.1
    stranger, _ = clusters(np.random.default_rng(2), centres[5:], 20)
    assert np.mean(enrolment.score(stranger)[1] < enrolment.threshold) >= 0.8
    # Saved and restored as plain lists (checkpoints load with weights_only).
    again = Enrolment.from_state(enrolment.state_dict())
    np.testing.assert_array_equal(again.score(stranger)[0], enrolment.score(stranger)[0])


def test_a_new_speaker_is_added_without_moving_the_others():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 24))
    vectors, names = clusters(rng, centres[:3], 9)
    first = enrol(vectors, names)
    newcomer, _ = clusters(rng, centres[3:], 4)
    second = enrol(newcomer, ["zoe"] * 4, first)
    assert second.speakers == ["zoe", "s0", "s1", "s2"] and second.counts == [4, 9, 9, 9]
    assert second.threshold == first.threshold
    np.testing.assert_array_equal(second.centroids[1:], first.centroids)
    probe, _ = clusters(rng, centres[3:], 5)
    nearest, scores = second.score(probe)
    assert (nearest == 0).all() and (scores >= second.threshold).all()
