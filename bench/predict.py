"""What `predict` gives a user, on held-out demo recordings, against what they would try first.

    python bench/predict.py [--steps 600] [--preset small]

Trains a model with the real trainer on all demo shards but the last, then runs
`model_trainer.py predict` on the held-out shard: sentiment and speaker accuracy (read from the
recordings and their transcripts, each slot hidden; and from the audio alone, as the baseline
reads it) against a baseline a user would try first (multinomial logistic regression on each segment's
mean log-mel, mean log-F0 of voiced frames, voiced share and mean energy, fitted on the
training shards), the character error rate of the text read from the audio (`--hide text`)
against the same model with the audio hidden too (`--hide text audio`) (what it can fill in without hearing anything), and segments/s.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from common import ROOT, header, logistic_regression, save

import demo_corpus  # noqa: E402 (path set by common)
import model_trainer  # noqa: E402


def segment_features(files) -> tuple[np.ndarray, list[dict]]:
    """Per segment: mean log-mel (80), mean log-F0 of voiced frames, voiced share, mean energy."""
    rows, labels = [], []
    for path in files:
        speakers = {i: name for name, i in json.loads(pq.read_schema(path).metadata[b"mmtrain"])["speakers"].items()}
        for row in pq.read_table(path, columns=["sample_id", "mel", "f0_hz", "energy", "speaker_id", "sentiment",
                                                "text"]).to_pylist():
            mel, f0 = np.asarray(row["mel"], np.float32), np.asarray(row["f0_hz"], np.float32)
            voiced = f0 > 0
            rows.append(np.concatenate([mel.mean(0), [np.log(f0[voiced]).mean() if voiced.any() else 0.0,
                                                      voiced.mean(), np.mean(row["energy"])]]))
            labels.append({"sample_id": row["sample_id"], "speaker": speakers.get(row["speaker_id"]),
                           "sentiment": row["sentiment"], "text": row["text"]})
    return np.stack(rows), labels


def cer(read: str, truth: str) -> tuple[int, int]:
    """Levenshtein distance and the reference length."""
    previous = list(range(len(truth) + 1))
    for i, a in enumerate(read, 1):
        current = [i]
        for j, b in enumerate(truth, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b)))
        previous = current
    return previous[-1], len(truth)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    shards = demo_corpus.build(ROOT / "data" / "demo")
    train_files, held_out = shards[:-1], shards[-1]
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    try:
        (work / "train").mkdir()
        (work / "held").mkdir()
        for f in train_files:
            shutil.copy(f, work / "train")
        shutil.copy(held_out, work / "held")
        started = time.perf_counter()
        assert model_trainer.main(["--data-dir", str(work / "train"), "--out", str(work / "run"), "--ws-port", "-1",
                                   "--steps", str(args.steps), "--preset", args.preset]) == 0
        train_seconds = time.perf_counter() - started
        checkpoint = work / "run" / f"ckpt-{args.steps:08d}.pt"
        runs = {}
        for name, hide in (("labels", []), ("audio heard", ["text"]), ("audio hidden", ["text", "audio"])):
            out = work / f"{name.replace(' ', '-')}.jsonl"
            started = time.perf_counter()
            assert model_trainer.main(["predict", "--checkpoint", str(checkpoint), "--data-dir", str(work / "held"),
                                       "--out", str(out), *(["--hide", *hide] if hide else [])]) == 0
            runs[name] = ([json.loads(line) for line in out.read_text().splitlines()], time.perf_counter() - started)

        x_train, train_labels = segment_features(train_files)
        x_test, test_labels = segment_features([held_out])
        names = sorted({r["speaker"] for r in train_labels})
        truth = {r["sample_id"]: r for r in test_labels}
        baseline = {}
        for task, classes, label in (("sentiment", 3, lambda r: r["sentiment"]),
                                     ("speaker", len(names), lambda r: names.index(r["speaker"]))):
            fit = logistic_regression(x_train, np.array([label(r) for r in train_labels]), classes)
            known = [i for i, r in enumerate(test_labels) if task == "sentiment" or r["speaker"] in names]
            predicted = fit(x_test[known])
            baseline[task] = float(np.mean([p == label(test_labels[i]) for p, i in zip(predicted, known)]))

        sentiments = ["negative", "neutral", "positive"]

        def accuracy(records):
            return {"sentiment": np.mean([sentiments.index(p["sentiment"]["label"]) == truth[p["sample_id"]]["sentiment"]
                                          for p in records]),
                    "speaker": np.mean([p["speaker"]["best_match"] == truth[p["sample_id"]]["speaker"]
                                        for p in records if truth[p["sample_id"]]["speaker"] in names])}

        predictions, seconds = runs["labels"]   # as a user runs it: the recordings with their transcripts
        ours, audio_only = accuracy(predictions), accuracy(runs["audio heard"][0])
        error_rates = {}
        for name in ("audio heard", "audio hidden"):
            records = runs[name][0]
            pairs = [cer(p["text"]["read"], truth[p["sample_id"]]["text"]) for p in records]
            error_rates[name] = sum(d for d, _ in pairs) / sum(n for _, n in pairs)
        chance = {"sentiment": max(np.bincount([r["sentiment"] for r in test_labels])) / len(test_labels)}
        lines = [*header(), f"# trained {args.steps} steps of {args.preset} on {len(train_files)} demo shards in "
                 f"{train_seconds:.0f} s; held out {held_out.name} ({len(test_labels)} segments)",
                 f"{'':<34} {'predict':>9} {'baseline':>9} {'majority':>9}",
                 f"{'sentiment accuracy':<34} {ours['sentiment']:>9.3f} {baseline['sentiment']:>9.3f} "
                 f"{chance['sentiment']:>9.3f}",
                 f"{'speaker accuracy':<34} {ours['speaker']:>9.3f} {baseline['speaker']:>9.3f} {'-':>9}",
                 f"{'sentiment accuracy, audio only':<34} {audio_only['sentiment']:>9.3f} {baseline['sentiment']:>9.3f} "
                 f"{chance['sentiment']:>9.3f}",
                 f"{'speaker accuracy, audio only':<34} {audio_only['speaker']:>9.3f} {baseline['speaker']:>9.3f} {'-':>9}",
                 f"{'CER, text read with audio heard':<34} {error_rates['audio heard']:>9.3f}",
                 f"{'CER, same model, audio hidden too':<34} {error_rates['audio hidden']:>9.3f}",
                 f"predict: {len(predictions) / seconds:.1f} segments/s on this machine (features read from Parquet, "
                 f"batched; includes loading the checkpoint)",
                 f"sentiment {ours['sentiment'] / baseline['sentiment']:.2f}x and speaker "
                 f"{ours['speaker'] / baseline['speaker']:.2f}x the logistic-regression baseline's accuracy"]
        print("\n".join(lines))
        save("predict", lines)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
