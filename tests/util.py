"""Helpers shared by the tests."""
import dataclasses
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import torch

import packing
from custom_transformer import Masks, sample_masks


def wait_for(condition, timeout: float = 20.0) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def make_rows(n, rng, vocab=260):
    rows = []
    for i in range(n):
        frames = int(rng.integers(3, 12))
        f0 = rng.uniform(80, 300, frames).astype(np.float32)
        rows.append({"sample_id": f"doc{i // 3}/{i % 3}", "doc_id": f"doc{i // 3}", "segment_index": i % 3,
                     "text": "t", "token_ids": rng.integers(0, vocab, int(rng.integers(1, 8))).astype(np.int32),
                     "mel": rng.normal(size=(frames, 80)).astype(np.float16), "f0_hz": f0,
                     "voicing": np.ones(frames, np.float32), "energy": rng.normal(size=frames).astype(np.float32),
                     "speaker_id": int(rng.integers(4)), "sentiment": int(rng.integers(3)),
                     "valence": None, "arousal": 0.5})
    return rows


META = {"features": {"sample_rate": 16000}, "tokenizer": {"vocab_size": 260}, "speakers": {"a": 0, "b": 3}}


def step_batches(shards, layout, model_cfg, sizes):
    """Consecutive packed sequences as batches of the given sizes, and all of them as one batch,
    with masks drawn once per batch and concatenated for the union (rows keep their order)."""
    segments = [s for shard in shards for rb in pq.ParquetFile(shard).iter_batches()
                for s in packing.segments_from_batch(rb)]
    sequences = [seq for _, seq in packing.pack_sequences(enumerate(segments), layout)]
    pairs, start = [], 0
    for i, size in enumerate(sizes):
        batch = packing.collate(sequences[start:start + size], layout)
        pairs.append((batch, sample_masks(batch, model_cfg, torch.Generator().manual_seed(i))))
        start += size
    union = packing.collate(sequences[:start], layout)
    masks = Masks(*(torch.cat([getattr(m, f.name) for _, m in pairs]) for f in dataclasses.fields(Masks)))
    return pairs, union, masks


def self_signed_certificate(folder, name: str = "server"):
    """A TLS certificate for localhost and 127.0.0.1 and its key (openssl) -> their paths."""
    cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key
