"""What a user gets from training on recordings the project did not make, against the simplest
baseline they would try first.

    python bench/real_recordings.py [--steps 1200] [--curve 300 600] [--preset small]

The corpus comes from Debian packages (installed by this script where it can, as root):
human prompt recordings (asterisk-core-sounds en/es: one voice talent in two languages; fr:
another), a LibriVox reader and a card-game speaker (pocketsphinx-testdata), and two-speaker
conversations of voices built from recorded speakers (festival's kal, ked, slt and the Italian
lp) and formant voices (espeak-ng), whose sentiment is in the words and in the prosody (sox
raises pitch and tempo for positive turns and lowers them for negative ones). Split by
recording and conversation; one human (the card-game speaker) and one conversation voice (lp)
are never heard in training.

Table: majority class; multinomial logistic regression on each segment's log-mel mean and
standard deviation and mean log-F0 (161 numbers, the "filterbank" baseline); a linear probe
(the same regression) on `embed` vectors; `predict`; speaker and sentiment accuracy on held-out
segments, unseen speakers flagged `unknown` and known ones flagged wrongly; at each step count
of --curve and --steps (the learning curve). Each checkpoint is finished as a run finishes its
last (`enroll --refit-sentiment` with the training files: the sentiment head refit, the
training speakers enrolled); `predict` runs twice: with the speaker head's probability (unknown
below 0.5), and by enrolment (cosine score against the speakers' centroids, unknown below the
calibrated threshold).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from common import ROOT, header, logistic_regression, save

import checkpoint  # noqa: E402 (path set by common)
import config  # noqa: E402 (path set by common)
import features  # noqa: E402
import model_trainer  # noqa: E402

PACKAGES = ["festival", "festvox-kallpc16k", "festvox-kdlpc16k", "festvox-us-slt-hts", "espeak-ng", "sox",
            "festvox-italp16k", "asterisk-core-sounds-en-wav", "asterisk-core-sounds-es-wav", "asterisk-core-sounds-fr-wav",
            "pocketsphinx-testdata"]
SOUNDS = Path("/usr/share/asterisk/sounds")
POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")
FESTIVAL = {"kal": "voice_kal_diphone", "ked": "voice_ked_diphone", "slt": "voice_cmu_us_slt_arctic_hts",
            "lp": "voice_lp_diphone"}   # lp: an Italian voice reading English, never heard in training
ESPEAK = {"espeak-m1": "en+m1", "espeak-f3": "en+f3", "espeak-m5": "en-us+m5", "espeak-f5": "en+f5"}
UNSEEN = {"cards", "lp"}
PROMPTS_PER_LANGUAGE = 140
CONVERSATIONS, TURNS, HELD_OUT_CONVERSATIONS = 48, 6, 12

TOPICS = ["the new project", "the weather", "dinner", "the report", "the trip", "the meeting", "the garden",
          "the car", "the music", "the results", "the house", "the game"]
SENTENCES = {
    "positive": ["I really love {}", "{} was wonderful today", "what a great time with {}",
                 "thank you so much, {} is perfect", "I am so happy about {}", "{} made my day, it is brilliant"],
    "negative": ["I really hate {}", "{} was terrible today", "what an awful mess {} is",
                 "this is a disaster, {} is broken", "I am so angry about {}", "{} ruined my day, it is horrible"],
    "neutral": ["{} is on the list", "we talk about {} at three", "please send me the notes on {}",
                "{} is scheduled for monday", "I read about {} yesterday", "the file about {} is in the folder"],
}
PROSODY = {"positive": ["pitch", "250", "tempo", "1.12"], "negative": ["pitch", "-250", "tempo", "0.85"],
           "neutral": []}


def ensure_packages() -> None:
    missing = [p for p in PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    print(f"installing {' '.join(missing)}", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env={"DEBIAN_FRONTEND": "noninteractive",
                                                                           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if done.returncode != 0:
        raise SystemExit(f"needs the Debian packages {' '.join(missing)}: apt-get install them (as root)")


def held_out(key: str, share: float = 0.2) -> bool:
    """A stable split by recording."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def transcripts(language: str) -> dict[str, str]:
    path = Path(f"/usr/share/doc/asterisk-core-sounds-{language}/core-sounds-{language}.txt.gz")
    lines = gzip.open(path, "rt", encoding="utf-8", errors="replace").read().splitlines() if path.exists() else []
    pairs = (line.partition(":") for line in lines if not line.startswith(";"))
    return {name.strip(): text.strip() for name, _, text in pairs if text.strip()}


def human_rows() -> list[dict]:
    rows = []
    for folder, language, speaker in (("en_US_f_Allison", "en", "allison"), ("es_MX_f_Allison", "es", "allison"),
                                      ("fr_CA_f_June", "fr", "june")):
        texts = transcripts(language)
        files = sorted((SOUNDS / folder).rglob("*.wav"))
        random.Random(language).shuffle(files)
        for path in files[:PROMPTS_PER_LANGUAGE]:
            name = str(path.relative_to(SOUNDS / folder).with_suffix(""))
            row = {"audio": str(path), "speaker": speaker, "doc_id": f"{language}/{name}"}
            if texts.get(name):
                row["text"] = texts[name]
            rows.append(row)
    for folder, speaker in (("librivox", "librivox"), ("cards", "cards")):
        listing = next((POCKETSPHINX / folder).glob("*transcription"))
        for line in listing.read_text().splitlines():
            text, _, name = line.rpartition("(")
            name = name.strip(" )")
            rows.append({"audio": str(POCKETSPHINX / folder / f"{name}.wav"), "speaker": speaker,
                         "doc_id": f"{folder}/{name}", "text": text.replace("<s>", "").replace("</s>", "").strip()})
    return rows


def synthesize(voice: str, text: str, sentiment: str, out: Path) -> None:
    plain = out.with_suffix(".plain.wav")
    if voice in FESTIVAL:
        subprocess.run(["text2wave", "-eval", f"({FESTIVAL[voice]})", "-o", str(plain)], input=text, text=True,
                       check=True, capture_output=True, timeout=120)
    else:
        subprocess.run(["espeak-ng", "-v", ESPEAK[voice], "-w", str(plain), text], check=True, capture_output=True,
                       timeout=120)
    # -R: repeatable dither (sox otherwise seeds it afresh: every build a different corpus)
    subprocess.run(["sox", "-R", str(plain), "-r", "16000", "-c", "1", str(out), *PROSODY[sentiment]], check=True,
                   capture_output=True, timeout=120)
    plain.unlink()


def conversation_rows(folder: Path) -> list[dict]:
    rng = random.Random(7)
    known = [v for v in [*FESTIVAL, *ESPEAK] if v not in UNSEEN]
    rows = []
    for c in range(CONVERSATIONS):
        test = c >= CONVERSATIONS - HELD_OUT_CONVERSATIONS
        pair = rng.sample(known, 2)
        if test and c % 2:   # half the held-out conversations have a voice never heard in training
            pair[1] = sorted(UNSEEN - {"cards"})[0]
        for turn in range(TURNS):
            sentiment = rng.choice(list(SENTENCES))
            text = rng.choice(SENTENCES[sentiment]).format(rng.choice(TOPICS))
            text = text[0].upper() + text[1:] + "."
            path = folder / f"conv{c:02d}_{turn}.wav"
            if not path.exists():
                synthesize(pair[turn % 2], text, sentiment, path)
            rows.append({"audio": str(path), "text": text, "speaker": pair[turn % 2], "sentiment": sentiment,
                         "doc_id": f"conv{c:02d}", "segment_index": turn, "split": "test" if test else "train"})
    return rows


def build(work: Path, max_positions: int) -> tuple[Path, Path]:
    """-> the training and held-out Parquet folders (cached under `work`)."""
    train_dir, test_dir = work / "train", work / "test"
    if (work / "done").exists():
        return train_dir, test_dir
    (work / "wav").mkdir(parents=True, exist_ok=True)
    rows = human_rows() + conversation_rows(work / "wav")
    for row in rows:
        if "split" not in row:
            row["split"] = "test" if row["speaker"] in UNSEEN or held_out(row["doc_id"]) else "train"
    for split, out in (("train", train_dir), ("test", test_dir)):
        manifest = work / f"{split}.jsonl"
        manifest.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n"
                                    for r in rows if r["split"] == split))
        features.prepare(manifest, out, max_positions=max_positions, log=lambda line: print(line, file=sys.stderr))
    (work / "done").write_text("")
    return train_dir, test_dir


def segment_table(folder: Path) -> tuple[np.ndarray, list[dict]]:
    """Per segment: the 161 filterbank numbers (log-mel mean and std, mean log-F0 of voiced
    frames) and its labels."""
    x, labels = [], []
    for path in sorted(folder.glob("*.parquet")):
        names = {i: n for n, i in json.loads(pq.read_schema(path).metadata[b"mmtrain"])["speakers"].items()}
        for row in pq.read_table(path, columns=["sample_id", "mel", "f0_hz", "speaker_id", "sentiment"]).to_pylist():
            mel, f0 = np.asarray(row["mel"], np.float32), np.asarray(row["f0_hz"], np.float32)
            voiced = f0 > 0
            x.append(np.concatenate([mel.mean(0), mel.std(0), [np.log(f0[voiced]).mean() if voiced.any() else 0.0]]))
            labels.append({"sample_id": row["sample_id"], "speaker": names.get(row["speaker_id"]),
                           "sentiment": row["sentiment"] if row["sentiment"] >= 0 else None})
    return np.stack(x), labels


def accuracies(fit_x, fit_labels, test_x, test_labels, known: list[str]) -> dict[str, float]:
    """The regression fitted on one table and scored on the other, per task."""
    result = {}
    for task, classes, label in (("speaker", len(known), lambda r: known.index(r["speaker"])),
                                 ("sentiment", 3, lambda r: r["sentiment"])):
        usable = (lambda r: r["speaker"] in known) if task == "speaker" else (lambda r: r["sentiment"] is not None)
        train = [i for i, r in enumerate(fit_labels) if usable(r)]
        test = [i for i, r in enumerate(test_labels) if usable(r)]
        fit = logistic_regression(fit_x[train], np.array([label(fit_labels[i]) for i in train]), classes)
        result[task] = float(np.mean(fit(test_x[test]) == np.array([label(test_labels[i]) for i in test])))
    return result


def embedded(checkpoint: Path, folder: Path, out: Path) -> np.ndarray:
    assert model_trainer.main(["embed", "--checkpoint", str(checkpoint), "--data-dir", str(folder), "--out",
                               str(out)]) == 0
    table = pq.read_table(out)
    order = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
    return np.stack(table.column("vector").to_pylist()), order


def predicted(checkpoint: Path, folder: Path, out: Path, test_labels: list[dict], known: list[str]) -> dict:
    assert model_trainer.main(["predict", "--checkpoint", str(checkpoint), "--data-dir", str(folder), "--out",
                               str(out)]) == 0
    truth = {r["sample_id"]: r for r in test_labels}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    sentiments = ["negative", "neutral", "positive"]
    seen = [r for r in records if truth[r["sample_id"]]["speaker"] in known]
    unseen = [r for r in records if truth[r["sample_id"]]["speaker"] not in known]
    labelled = [r for r in records if truth[r["sample_id"]]["sentiment"] is not None]
    return {"speaker": np.mean([r["speaker"]["label"] == truth[r["sample_id"]]["speaker"] for r in seen]),
            "speaker_best": np.mean([r["speaker"]["best_match"] == truth[r["sample_id"]]["speaker"] for r in seen]),
            "sentiment": np.mean([sentiments.index(r["sentiment"]["label"]) == truth[r["sample_id"]]["sentiment"]
                                  for r in labelled]),
            "unseen_flagged": np.mean([r["speaker"]["label"] == "unknown" for r in unseen]) if unseen else float("nan"),
            "unseen_by_speaker": {name: float(np.mean([r["speaker"]["label"] == "unknown" for r in unseen
                                                       if truth[r["sample_id"]]["speaker"] == name]))
                                  for name in sorted({truth[r["sample_id"]]["speaker"] for r in unseen})},
            "known_flagged": np.mean([r["speaker"]["label"] == "unknown" for r in seen])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--curve", type=int, nargs="*", default=[300, 600], help="also score these step counts")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--set", action="append", default=[], help="config overrides for the run (repeatable)")
    parser.add_argument("--work", default=str(ROOT / "data" / "real"), help="corpus and run folder")
    args = parser.parse_args()
    ensure_packages()
    work = Path(args.work)
    cfg = config.load_config(str(config.DEFAULT_CONFIG), args.set, args.preset)
    started = time.perf_counter()
    train_dir, test_dir = build(work / "corpus", cfg.data.max_seq_len)
    corpus_seconds = time.perf_counter() - started
    x_train, train_labels = segment_table(train_dir)
    x_test, test_labels = segment_table(test_dir)
    known = sorted({r["speaker"] for r in train_labels if r["speaker"]})
    baseline = accuracies(x_train, train_labels, x_test, test_labels, known)
    majority = {task: max(np.mean([r[task] == value for r in test_labels if r[task] in choices])
                          for value in choices)
                for task, choices in (("speaker", known), ("sentiment", [0, 1, 2]))}

    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    steps = sorted({*args.curve, args.steps})
    started = time.perf_counter()
    assert model_trainer.main(["--data-dir", str(train_dir), "--out", str(run), "--ws-port", "-1", "--steps",
                               str(args.steps), "--preset", args.preset, *[f"--set={s}" for s in args.set],
                               "--set", f"train.keep_checkpoints={len(steps) + 1}",
                               "--set", f"train.checkpoint_every={min(steps)}"]) == 0
    train_seconds = time.perf_counter() - started
    curve = {}
    for step in steps:
        saved = run / f"ckpt-{step:08d}.pt"
        if not saved.exists():
            continue
        train_vectors, train_order = embedded(saved, train_dir, work / "embed-train.parquet")
        test_vectors, test_order = embedded(saved, test_dir, work / "embed-test.parquet")
        probe = accuracies(train_vectors[[train_order[r["sample_id"]] for r in train_labels]], train_labels,
                           test_vectors[[test_order[r["sample_id"]] for r in test_labels]], test_labels, known)
        # Every checkpoint finished as the run finishes its last (sentiment head refit, training
        # speakers enrolled from the training files), then the speaker head alone (no enrolment).
        bare, enrolled, head = work / "bare.pt", work / "enrolled.pt", work / "head.pt"
        checkpoint.write_atomically(bare, {k: v for k, v in checkpoint.load_checkpoint(saved).items()
                                           if k != "enrolment"})
        assert model_trainer.main(["enroll", "--refit-sentiment", "--checkpoint", str(bare), "--data-dir",
                                   str(train_dir), "--out", str(enrolled)]) == 0
        checkpoint.write_atomically(head, {k: v for k, v in checkpoint.load_checkpoint(enrolled).items()
                                           if k != "enrolment"})
        curve[step] = (probe, predicted(head, test_dir, work / "predict.jsonl", test_labels, known),
                       predicted(enrolled, test_dir, work / "predict-enrolled.jsonl", test_labels, known))

    speakers = {name: sum(r["speaker"] == name for r in train_labels) for name in known}
    unseen_count = sum(r["speaker"] not in known for r in test_labels)
    lines = [*header(),
             f"# corpus: {len(train_labels)} training segments of {len(known)} speakers "
             f"({', '.join(f'{n} {c}' for n, c in speakers.items())}); {len(test_labels)} held-out segments, "
             f"{unseen_count} of them by speakers never heard in training ({', '.join(sorted(UNSEEN))}); "
             f"built in {corpus_seconds:.0f} s",
             f"# {args.preset} preset {' '.join(args.set)}, {args.steps} steps in {train_seconds:.0f} s",
             "",
             f"{'method (held-out segments)':<44} {'speaker':>8} {'sentiment':>9} {'unseen flagged':>14} "
             f"{'known flagged':>13}",
             f"{'majority class':<44} {majority['speaker']:>8.3f} {majority['sentiment']:>9.3f}",
             f"{'logistic regression on filterbank stats':<44} {baseline['speaker']:>8.3f} {baseline['sentiment']:>9.3f}"]
    for step, (probe, *answers) in curve.items():
        lines.append(f"{f'linear probe on embed, {step} steps':<44} {probe['speaker']:>8.3f} {probe['sentiment']:>9.3f}")
        for how, ours in zip(("speaker head", "enrolled"), answers):
            lines.append(f"{f'predict ({how}), {step} steps':<44} {ours['speaker']:>8.3f} {ours['sentiment']:>9.3f} "
                         f"{ours['unseen_flagged']:>14.3f} {ours['known_flagged']:>13.3f}")
    if curve:
        probe, _, ours = curve[max(curve)]
        lines.append("unseen flagged by speaker (enrolled, last): " + ", ".join(
            f"{name} {share:.2f}" for name, share in ours["unseen_by_speaker"].items()))
        lines += ["", f"probe / baseline: speaker {probe['speaker'] / baseline['speaker']:.2f}x, sentiment "
                      f"{probe['sentiment'] / baseline['sentiment']:.2f}x; predict / baseline: speaker "
                      f"{ours['speaker'] / baseline['speaker']:.2f}x (nearest speaker regardless of unknown: "
                      f"{ours['speaker_best'] / baseline['speaker']:.2f}x), sentiment "
                      f"{ours['sentiment'] / baseline['sentiment']:.2f}x"]
    print("\n".join(lines))
    save("real_recordings", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
