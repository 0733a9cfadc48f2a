"""A demo corpus made here, with nothing downloaded: synthetic speech for multi-speaker
conversations whose sentiment shows in both the words and the prosody.

Sentences come from a small grammar; a source-filter synthesizer (a glottal sawtooth at a
pitch contour, or noise, through formant resonators) speaks them letter by letter. Speakers
differ in pitch, vocal-tract length (formant scaling) and rate; positive speech is higher,
rising, faster and louder, negative speech lower, falling, slower and softer. The WAVs and a
manifest are written first, then features.py turns them into Parquet exactly as it would real
recordings.

    python demo_corpus.py --out data/demo [--conversations 50] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio

import features

SAMPLE_RATE = 16000
COMPLETE_MARKER = "COMPLETE"   # written last; holds the recipe, so a changed recipe rebuilds
CORPUS_VERSION = 2             # 2: character alignment (token_start_frame)

SUBJECTS = ["the team", "my neighbour", "our project", "the weather", "this movie", "the new plan",
            "her garden", "the trip", "your idea", "the meeting"]
PREDICATES = {
    0: ["is terrible", "was a total failure", "made me so sad", "looks really grim",
        "feels awful today", "went badly wrong"],
    1: ["is on the table", "was moved to monday", "starts at noon", "has four parts",
        "is in the next room", "comes up later"],
    2: ["is wonderful", "was a great success", "made me so happy", "looks really bright",
        "feels amazing today", "went perfectly well"],
}
OPENERS = {0: ["sadly", "oh no", "honestly"], 1: ["well", "so", "okay"],
           2: ["wow", "great news", "honestly"]}


@dataclass(frozen=True)
class Speaker:
    name: str
    f0: float            # Hz
    formant_scale: float  # shorter vocal tract -> higher formants
    rate: float          # >1 speaks faster


SPEAKERS = [Speaker("ann", 210.0, 1.17, 1.05), Speaker("bob", 105.0, 0.92, 0.95),
            Speaker("cat", 240.0, 1.22, 1.10), Speaker("dan", 125.0, 1.00, 1.00),
            Speaker("eve", 180.0, 1.12, 0.90), Speaker("fred", 92.0, 0.88, 1.00)]

# Per sentiment: pitch factor, pitch slope over the utterance, pitch excursion, duration factor, loudness.
PROSODY = {0: (0.88, -0.25, 0.04, 1.20, 0.45), 1: (1.00, -0.08, 0.06, 1.00, 0.70),
           2: (1.15, 0.20, 0.16, 0.85, 1.00)}

VOWELS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010),
          "o": (570, 840, 2410), "u": (300, 870, 2240), "y": (300, 2000, 2700)}
VOICED = set("bdgjlmnrvwz")
FRICATIVES = {"s": 5000, "c": 4500, "f": 3500, "h": 1500, "x": 4000, "q": 2000}
STOPS = {"p": 800, "t": 3500, "k": 2500}


def compose_sentence(rng: np.random.Generator, sentiment: int) -> str:
    opener = OPENERS[sentiment][rng.integers(len(OPENERS[sentiment]))]
    subject = SUBJECTS[rng.integers(len(SUBJECTS))]
    predicate = PREDICATES[sentiment][rng.integers(len(PREDICATES[sentiment]))]
    return f"{opener}, {subject} {predicate}."


def _resonator_coeffs(freq: np.ndarray, bandwidth: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Klatt's two-pole resonator, unity gain at DC: y[n] = A x[n] + B y[n-1] + C y[n-2]."""
    c = -np.exp(-2 * np.pi * bandwidth / SAMPLE_RATE)
    b = 2 * np.exp(-np.pi * bandwidth / SAMPLE_RATE) * np.cos(2 * np.pi * freq / SAMPLE_RATE)
    a = 1 - b - c
    a_coeffs = torch.tensor(np.stack([np.ones_like(b), -b, -c], 1), dtype=torch.float32)
    b_coeffs = torch.tensor(np.stack([a, np.zeros_like(a), np.zeros_like(a)], 1), dtype=torch.float32)
    return a_coeffs, b_coeffs


def synthesize(text: str, speaker: Speaker, sentiment: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, list[float]]:
    """Speak `text` letter by letter -> (mono float32 at SAMPLE_RATE, each character's start in s)."""
    pitch_factor, slope, excursion, duration_factor, loudness = PROSODY[sentiment]
    phones = []  # (kind, formants or noise centre, duration s)
    first_phone = []  # per character
    for ch in text.lower():
        first_phone.append(len(phones))
        if ch in VOWELS:
            phones.append(("vowel", VOWELS[ch], 0.085))
        elif ch in VOICED:
            phones.append(("voiced", (250, 1300, 2500), 0.055))
        elif ch in FRICATIVES:
            phones.append(("noise", (FRICATIVES[ch],), 0.070))
        elif ch in STOPS:
            phones.append(("silence", (), 0.035))
            phones.append(("noise", (STOPS[ch],), 0.020))
        elif ch in ",.":
            phones.append(("silence", (), 0.16))
        else:
            phones.append(("silence", (), 0.04))
    scale = duration_factor / speaker.rate
    lengths = np.array([max(1, int(d * scale * rng.uniform(0.85, 1.15) * SAMPLE_RATE)) for *_, d in phones])
    total = int(lengths.sum())
    t = np.linspace(0.0, 1.0, total)
    contour = speaker.f0 * pitch_factor * (1 + slope * (t - 0.5)) * (
        1 + excursion * np.sin(2 * np.pi * (1.5 * t + rng.uniform())))
    f0 = contour * (1 + 0.005 * rng.standard_normal(total))  # jitter
    phase = np.cumsum(f0) / SAMPLE_RATE
    glottal = 2.0 * (phase % 1.0) - 1.0
    noise = rng.standard_normal(total) * 0.5

    longest = int(lengths.max())
    sources = np.zeros((len(phones), longest), np.float32)
    formants = np.zeros((len(phones), 3))
    bandwidths = np.tile([90.0, 110.0, 170.0], (len(phones), 1))
    gains = np.zeros(len(phones))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for i, ((kind, centres, _), start, n) in enumerate(zip(phones, starts, lengths)):
        if kind in ("vowel", "voiced"):
            sources[i, :n] = glottal[start:start + n]
            formants[i] = np.array(centres) * speaker.formant_scale
            gains[i] = 1.0 if kind == "vowel" else 0.35
        elif kind == "noise":
            sources[i, :n] = noise[start:start + n]
            formants[i] = centres[0] * speaker.formant_scale
            bandwidths[i] = 1200.0
            gains[i] = 0.12
        else:
            formants[i] = 500.0
    formants = np.minimum(formants, SAMPLE_RATE / 2 - 500)
    shaped = torch.from_numpy(sources)
    for f in range(3):
        a_coeffs, b_coeffs = _resonator_coeffs(formants[:, f], bandwidths[:, f])
        shaped = torchaudio.functional.lfilter(shaped, a_coeffs, b_coeffs, clamp=False, batching=True)
    shaped = shaped.numpy()
    ramp = int(0.008 * SAMPLE_RATE)
    out = np.zeros(total, np.float32)
    for i, (start, n) in enumerate(zip(starts, lengths)):
        envelope = np.ones(n)
        r = min(ramp, n // 2)
        if r:
            envelope[:r] = np.linspace(0, 1, r)
            envelope[n - r:] = np.linspace(1, 0, r)
        chunk = shaped[i, :n]
        peak = np.abs(chunk).max() or 1.0
        out[start:start + n] = chunk / peak * gains[i] * envelope
    out = out * 0.6 * loudness + 0.002 * rng.standard_normal(total)
    return np.clip(out, -1, 1).astype(np.float32), (starts[first_phone] / SAMPLE_RATE).tolist()


def write_recordings(out_dir: Path, n_conversations: int, seed: int) -> Path:
    """Synthesize the conversations as WAVs; returns the manifest path."""
    rng = np.random.default_rng(seed)
    wav_dir = out_dir / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for c in range(n_conversations):
        doc_id = f"conv{c:04d}"
        pair = rng.choice(len(SPEAKERS), 2, replace=False)
        mood = int(rng.integers(3))
        for segment in range(int(rng.integers(4, 9))):
            speaker = SPEAKERS[pair[segment % 2]]
            sentiment = mood if rng.uniform() < 0.7 else int(rng.integers(3))
            text = compose_sentence(rng, sentiment)
            audio, char_start_s = synthesize(text, speaker, sentiment, rng)
            path = wav_dir / f"{doc_id}_{segment:02d}.wav"
            features.write_wav(path, audio, SAMPLE_RATE)
            entries.append({"audio": str(path.relative_to(out_dir)), "text": text,
                            "speaker": speaker.name, "sentiment": sentiment, "doc_id": doc_id,
                            "segment_index": segment, "valence": [-0.7, 0.0, 0.7][sentiment],
                            "arousal": [0.3, 0.2, 0.7][sentiment], "char_start_s": char_start_s})
    manifest = out_dir / "manifest.jsonl"
    with open(manifest, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    return manifest


def build(out_dir: str | Path, n_conversations: int = 50, seed: int = 0,
          rows_per_shard: int = 80, rows_per_group: int = 20) -> list[Path]:
    """WAVs + manifest, then Parquet shards under out_dir/parquet; skipped when a corpus of the
    same recipe is already complete."""
    out_dir = Path(out_dir)
    parquet_dir = out_dir / "parquet"
    marker = out_dir / COMPLETE_MARKER
    recipe = f"version={CORPUS_VERSION} conversations={n_conversations} seed={seed}\n"
    if marker.exists() and marker.read_text() == recipe:
        return sorted(parquet_dir.glob("*.parquet"))
    for stale in (parquet_dir, out_dir / "wav"):
        shutil.rmtree(stale, ignore_errors=True)
    torch.manual_seed(seed)
    manifest = write_recordings(out_dir, n_conversations, seed)
    speaker_ids = {s.name: i for i, s in enumerate(SPEAKERS)}
    shards = features.prepare(manifest, parquet_dir, rows_per_shard, rows_per_group,
                              speaker_ids=speaker_ids)
    marker.write_text(recipe)
    return shards


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shards = build(args.out, args.conversations, args.seed)
    print(f"demo corpus: {len(shards)} Parquet files in {Path(args.out) / 'parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
