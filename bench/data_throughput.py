"""Can the data path feed training? Local Parquet reads against Flight over loopback, and the
dataset's end-to-end rate against what the presets consume.

    python bench/data_throughput.py [--rows-per-file 500] [--files 4]

The files are synthetic samples of the real schema (6 s of audio each), written once to
data/bench. The Flight server runs in its own process, as on a data machine; a second one
serving the same files (replicas, as two data machines would) gives the dataset's rate over two
servers, its reads spread over both and read ahead (on this 2-core machine the two servers and
the packing share the cores, so this row shows the mechanism, not a second machine's gain).
Headlines: Flight (1 stream) / local read rate (goal >= 0.5 here), and dataset rate / `small`
consumption (goal >= 10x).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.flight as flight
import pyarrow.parquet as pq
import torch

from common import ROOT, machine, save

import config  # noqa: E402 (path set by common)
import datasets  # noqa: E402 (path set by common)
import flight_client  # noqa: E402 (path set by common)
import model_trainer  # noqa: E402
import packing  # noqa: E402 (path set by common)
import schema  # noqa: E402 (path set by common)
import step_feed  # noqa: E402
from custom_transformer import CustomTransformer, sample_masks  # noqa: E402

BENCH_DIR = ROOT / "data" / "bench"


def make_files(n_files: int, rows: int) -> list:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for f in range(n_files):
        path = BENCH_DIR / f"bench-{f:02d}-{rows}.parquet"
        if not path.exists():
            samples = []
            for i in range(rows):
                frames, tokens = 600, 80
                f0 = np.where(rng.uniform(size=frames) < 0.7, rng.uniform(80, 300, frames), 0).astype(np.float32)
                samples.append({"sample_id": f"b{f}/{i}", "doc_id": f"b{f}/{i // 6}", "segment_index": i % 6, "text": "x",
                                "token_ids": rng.integers(4, 260, tokens).astype(np.int32),
                                "mel": rng.normal(size=(frames, 80)).astype(np.float16), "f0_hz": f0,
                                "voicing": (f0 > 0).astype(np.float32), "energy": rng.normal(size=frames).astype(np.float32),
                                "speaker_id": int(rng.integers(8)), "sentiment": int(rng.integers(3))})
            meta = {"features": {}, "tokenizer": {"vocab_size": 260}, "speakers": {str(s): s for s in range(8)}}
            schema.write_samples(path, samples, meta, rows_per_group=100)
        paths.append(path)
    return paths


def rate(fn) -> tuple[float, float, float]:
    """-> (MB/s, rows/s, seconds) of fn(), which returns (bytes, rows)."""
    start = time.perf_counter()
    nbytes, rows = fn()
    seconds = time.perf_counter() - start
    return nbytes / seconds / 1e6, rows / seconds, seconds


def read_local(paths):
    nbytes = rows = 0
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            nbytes += batch.nbytes
            rows += batch.num_rows
    return nbytes, rows


def read_flight(port: int, names: list[str], streams: int):
    totals = [[0, 0] for _ in range(streams)]

    def work(part):
        client = flight.connect(f"grpc://127.0.0.1:{port}")
        for name in names[part::streams]:
            info = client.get_flight_info(flight.FlightDescriptor.for_path(name))
            for endpoint in info.endpoints:
                for chunk in client.do_get(endpoint.ticket):
                    totals[part][0] += chunk.data.nbytes
                    totals[part][1] += chunk.data.num_rows

    threads = [threading.Thread(target=work, args=(p,)) for p in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(t[0] for t in totals), sum(t[1] for t in totals)


def consumption(preset: str, steps: int, overrides: list[str]) -> float:
    """Positions per second a preset's training step consumes on this machine."""
    cfg = config.load_config(str(ROOT / "config.yaml"), overrides, preset)
    layout = packing.SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
    files = sorted((ROOT / "data" / "demo" / "parquet").glob("*.parquet"))
    dataset = datasets.LocalParquetDataset(files, layout, cfg.data.batch_size)
    model = CustomTransformer(cfg.model)
    model.set_corpus_stats(schema.corpus_info(dataset.metadata()))
    optimizer, scheduler = model_trainer.make_optimizer(model, cfg.train, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stream = step_feed.batches(dataset, 0)
    positions, seconds = 0, 0.0
    for step in range(steps + 1):
        batch = next(stream)
        masks = sample_masks(batch, cfg.model, torch.Generator().manual_seed(step))
        start = time.perf_counter()
        model_trainer.train_step(model, [(batch, masks)], optimizer, scheduler, scaler, torch.device("cpu"),
                                 torch.float32, cfg.train.grad_clip)
        if step:   # the first step warms up
            seconds += time.perf_counter() - start
            positions += batch.n_positions(cfg.model.frames_per_position)
    return positions / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-per-file", type=int, default=500)
    parser.add_argument("--files", type=int, default=4)
    args = parser.parse_args()
    paths = make_files(args.files, args.rows_per_file)
    names = [p.name for p in paths]
    port, second_port = 18815, 18816
    servers = [subprocess.Popen([sys.executable, str(ROOT / "flight_server.py"), "--root", str(BENCH_DIR),
                                 "--port", str(p)], stderr=subprocess.DEVNULL, cwd=ROOT) for p in (port, second_port)]
    try:
        for p in (port, second_port):
            flight.connect(f"grpc://127.0.0.1:{p}").wait_for_available(timeout=30)
        read_local(paths)   # warm the page cache so both sides read from memory
        for p in (port, second_port):   # each server checks a file's values the first time it serves it
            read_flight(p, names, 1)
        local = rate(lambda: read_local(paths))
        one = rate(lambda: read_flight(port, names, 1))
        two = rate(lambda: read_flight(port, names, 2))
        small_cfg = config.load_config(str(ROOT / "config.yaml"), [], "small")
        layout = packing.SequenceLayout(small_cfg.data.max_seq_len, small_cfg.model.frames_per_position)
        rates = []
        for hosts in (["127.0.0.1"], ["127.0.0.1", f"127.0.0.1:{second_port}"]):
            dataset = datasets.ArrowFlightDataset(flight_client.Connection(tuple(hosts), port), names, layout, small_cfg.data.batch_size)
            start = time.perf_counter()
            produced = sum(b.n_positions(layout.frames_per_position) for b in dataset)
            rates.append(produced / (time.perf_counter() - start))
        dataset_rate, two_servers_rate = rates
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    small = consumption("small", 5, [])
    base = consumption("base", 2, ["data.max_seq_len=2048", "data.batch_size=1"])
    lines = [f"# bench/data_throughput.py --files {args.files} --rows-per-file {args.rows_per_file}",
             f"# {machine()}",
             f"# {time.strftime('%Y-%m-%d %H:%M')}; {sum(p.stat().st_size for p in paths) / 1e6:.0f} MB on disk",
             f"{'path':<34} {'MB/s':>8} {'rows/s':>9}",
             f"{'local ParquetFile.iter_batches':<34} {local[0]:>8.0f} {local[1]:>9.0f}",
             f"{'Flight loopback, 1 stream':<34} {one[0]:>8.0f} {one[1]:>9.0f}",
             f"{'Flight loopback, 2 streams':<34} {two[0]:>8.0f} {two[1]:>9.0f}",
             f"dataset over Flight, `small` packing: {dataset_rate:,.0f} positions/s",
             f"dataset over two Flight servers (every file on both), `small` packing: {two_servers_rate:,.0f} "
             f"positions/s ({two_servers_rate / dataset_rate:.2f}x one server; same 2 cores)",
             f"training consumes on this CPU: small {small:,.0f} positions/s, base {base:,.0f} positions/s "
             f"(base at 2,048 positions)",
             f"headroom: {dataset_rate / small:.0f}x small, {dataset_rate / base:.0f}x base",
             f"Flight (1 stream) / local: {one[0] / local[0]:.2f} (goal >= 0.5); "
             f"dataset / small consumption: {dataset_rate / small:.0f}x (goal >= 10x)"]
    print("\n".join(lines))
    save("data_throughput", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
