"""The trainer: configuration, and the whole pipeline end to end (synthesizer -> features ->
Parquet -> Flight server on 127.0.0.1 -> trainer -> WebSocket client, checkpoint, resume)."""
import collections
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from websockets.sync.client import connect

import config
import datasets
import model_trainer
import packing
import parallel
import planning
import schema
import step_feed
import training_run
from checkpoint import load_checkpoint
from config import ModelConfig, load_config
from custom_transformer import CustomTransformer, sample_masks
from flight_server import SampleFlightServer
from parallel import Ranks
from util import step_batches

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.warmup_steps=5", "train.lr=0.003"]


def set_flags(items):
    """--preset tiny, then each item as --set."""
    return ["--preset", "tiny"] + [arg for item in items for arg in ("--set", item)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_config_yaml_mirrors_the_dataclasses_exactly():
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw.pop("presets")
    defaults = config.Config()
    assert set(raw) == {f.name for f in dataclasses.fields(defaults)}
    for section, values in raw.items():
        assert values == dataclasses.asdict(getattr(defaults, section)), section


def test_presets_build_and_have_their_intended_sizes():
    def parameters(preset):
        cfg = config.load_config(str(ROOT / "config.yaml"), [], preset)
        with torch.device("meta"):
            return cfg, sum(p.numel() for p in CustomTransformer(cfg.model).parameters())

    assert parameters("small")[0] == config.Config()
    tiny_cfg, tiny = parameters("tiny")
    base_cfg, base = parameters("base")
    long_cfg, _ = parameters("long")
    assert tiny < 200_000 and 90e6 < base < 110e6
    assert long_cfg.data.max_seq_len == 262_144 and long_cfg.model.activation_checkpointing
    # every preset reaches its whole document: sparse global layers (dense G costs O(n^2) at 256k)
    assert all("S" in cfg.model.layer_pattern for cfg in (tiny_cfg, base_cfg, long_cfg, config.Config()))
    with pytest.raises(ValueError, match="--preset 'huge'.*tiny, small, base, long"):
        config.load_config(str(ROOT / "config.yaml"), [], "huge")


def test_overrides_are_typed_and_unknown_keys_are_named():
    cfg = config.load_config(str(ROOT / "config.yaml"), ["train.steps=7", "model.causal=true", "train.lr=1"])
    assert cfg.train.steps == 7 and cfg.model.causal is True and cfg.train.lr == 1.0
    with pytest.raises(ValueError, match="model.d_modle"):
        config.load_config(None, ["model.d_modle=3"])
    with pytest.raises(ValueError, match="train.steps: expected int, got 'many'"):
        config.load_config(None, ["train.steps=many"])
    with pytest.raises(ValueError, match="unknown config section"):
        config.build_config({"optimiser": {}})
    with pytest.raises(ValueError, match="section.key=value"):
        config.load_config(None, ["steps=3"])
    with pytest.raises(ValueError, match="train.steps must be at least 1"):
        config.load_config(None, ["train.steps=0"])
    with pytest.raises(ValueError, match="data.batch_size must be at least 1"):
        config.load_config(None, ["data.batch_size=0"])


def test_cli_reports_config_errors_without_a_traceback():
    proc = subprocess.run([sys.executable, "model_trainer.py", "--set", "model.nope=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "config error: --set model.nope=1: unknown config key model.nope" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "model_trainer.py", "--steps", "5", "--set", "train.steps=7"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "config error: --steps 5 and --set train.steps=7 disagree: give one" in proc.stderr


def test_end_to_end_over_flight_with_live_metrics_and_a_checkpoint_that_reloads(corpus, tmp_path):
    root, shards = corpus
    server = SampleFlightServer(root, "127.0.0.1", 0)
    ws_port = free_port()
    run_dir = tmp_path / "run"
    files = [p.name for p in shards]
    cmd = [sys.executable, "model_trainer.py", "--flight-host", "127.0.0.1", "--port", str(server.port),
           "--files", *files, "--out", str(run_dir), "--ws-port", str(ws_port), "--steps", "40",
           *set_flags(TINY + ["train.checkpoint_every=20"])]
    received = []

    def listen():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with connect(f"ws://127.0.0.1:{ws_port}", open_timeout=2) as ws:
                    for raw in ws:
                        received.append(json.loads(raw))
                        if received[-1]["type"] in ("finished", "failed"):
                            return
            except OSError:
                time.sleep(0.2)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    listener.join(timeout=10)
    assert proc.returncode == 0, proc.stderr[-3000:]

    steps = [m for m in read_metrics(run_dir) if m["type"] == "step"]
    assert [m["step"] for m in steps] == list(range(1, 41))
    first, last = [sum(m["loss"] for m in part) / 5 for part in (steps[:5], steps[-5:])]
    assert last < 0.8 * first, (first, last)

    kinds = [m["type"] for m in received]
    assert kinds[0] == "run" and kinds[-1] == "finished" and "checkpoint" in kinds
    live_steps = [m for m in received if m["type"] == "step"]
    assert live_steps and all({"loss", "accuracy", "lr", "tokens_per_s"} <= set(m) for m in live_steps)

    checkpoints = sorted(run_dir.glob("ckpt-*.pt"))
    assert [p.name for p in checkpoints] == ["ckpt-00000020.pt", "ckpt-00000040.pt"]
    state = load_checkpoint(checkpoints[-1])
    model = CustomTransformer(ModelConfig(**state["config"]["model"]))
    model.load_state_dict(state["model"])
    dataset = datasets.LocalParquetDataset(shards, packing.SequenceLayout(256, 4), batch_size=2)
    batch = next(iter(dataset))
    loss, _ = model(batch, sample_masks(batch, model.cfg, torch.Generator().manual_seed(0)))
    assert torch.isfinite(loss) and loss.item() < first


def run_trainer(corpus_root, out, steps, *extra):
    return subprocess.Popen(
        [sys.executable, "model_trainer.py", "--data-dir", str(corpus_root), "--out", str(out), "--ws-port", "-1",
         "--steps", str(steps), *set_flags(TINY + ["train.checkpoint_every=100"]), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_checkpoints_and_resume_reproduces_the_uninterrupted_losses(corpus, tmp_path):
    root, _ = corpus
    steps = 14
    straight = run_trainer(root, tmp_path / "straight", steps)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-3000:]
    expected = [m["loss"] for m in read_metrics(tmp_path / "straight") if m["type"] == "step"]

    interrupted = run_trainer(root, tmp_path / "resumed", steps)
    metrics_file = tmp_path / "resumed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics_file.exists() and metrics_file.read_text().count('"type": "step"') >= 4):
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGTERM)
    assert interrupted.wait(timeout=120) == 0, interrupted.stderr.read()[-3000:]
    stopped_at = max(m["step"] for m in read_metrics(tmp_path / "resumed") if m["type"] == "step")
    assert stopped_at < steps, "the run finished before the signal arrived"
    assert (tmp_path / "resumed" / f"ckpt-{stopped_at:08d}.pt").exists()

    fresh = run_trainer(root, tmp_path / "resumed", steps)   # no --resume: refuses to overwrite
    assert fresh.wait(timeout=120) == 1 and "--resume auto" in fresh.stderr.read()

    resumed = run_trainer(root, tmp_path / "resumed", steps, "--resume", "auto")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    losses = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "resumed") if m["type"] == "step"}
    assert [losses[s] for s in range(1, steps + 1)] == expected   # bitwise on CPU


def poison_losses(monkeypatch, bad_calls):
    """Make the model return a NaN loss on the given (1-based) forward calls."""
    original = CustomTransformer.forward
    calls = []

    def forward(self, batch, masks, *rest, **options):
        loss, metrics = original(self, batch, masks, *rest, **options)
        calls.append(1)
        return (loss * float("nan"), metrics) if len(calls) in bad_calls else (loss, metrics)

    monkeypatch.setattr(CustomTransformer, "forward", forward)


def test_nan_steps_are_skipped_and_counted(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    poison_losses(monkeypatch, {3, 4})
    out = tmp_path / "nan"
    assert model_trainer.main(["--data-dir", str(root), "--out", str(out), "--ws-port", "-1", "--steps", "8",
                               *set_flags(TINY)]) == 0
    steps = [m for m in read_metrics(out) if m["type"] == "step"]
    assert [m["skipped"] for m in steps] == [False, False, True, True, False, False, False, False]
    assert steps[2]["loss"] is None and steps[-1]["nonfinite_steps"] == 2
    state = load_checkpoint(sorted(out.glob("ckpt-*.pt"))[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert state["nonfinite_steps"] == 2


def test_too_many_nan_steps_in_a_row_stop_with_a_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    root, _ = corpus
    poison_losses(monkeypatch, set(range(3, 100)))
    out = tmp_path / "halt"
    assert model_trainer.main(["--data-dir", str(root), "--out", str(out), "--ws-port", "-1", "--steps", "20",
                               *set_flags(TINY + ["train.max_nonfinite_steps=3"])]) == 1
    assert "3 steps in a row (up to step 5) had a non-finite loss" in capsys.readouterr().err
    state = load_checkpoint(out / "ckpt-00000005.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_prefetching_producer_can_run_epochs_ahead_of_the_consumer(corpus):
    """Recording consumed batches must not disturb the producer that already moved on."""
    _, shards = corpus
    dataset = datasets.LocalParquetDataset(shards, packing.SequenceLayout(300, 4), batch_size=2, seed=1)
    per_epoch = len(list(dataset))
    stream = step_feed.Prefetch(step_feed.batches(dataset, 0), depth=3 * per_epoch)
    seen = {}
    time.sleep(1.0)   # let the producer get a whole epoch ahead
    while True:
        batch = next(stream)
        dataset.record(batch)
        if batch.resume_from[0] == 3:
            break
        seen.setdefault(batch.resume_from[0], []).extend(batch.sample_ids)
    stream.close()
    expected = sorted(pq.read_table(shards, columns=["sample_id"]).column(0).to_pylist())
    assert sorted(seen) == [0, 1, 2] and all(sorted(ids) == expected for ids in seen.values())
    assert dataset.state_dict()["epoch"] == 3


def test_evaluation_on_held_out_files_keeps_the_best_checkpoint(corpus, tmp_path):
    root, shards = corpus
    out = tmp_path / "eval"
    held_out = shards[-1].name
    assert model_trainer.main(["--data-dir", str(root), "--eval-files", held_out, "--out", str(out),
                               "--ws-port", "-1", "--steps", "12", *set_flags(TINY + ["train.eval_every=5"])]) == 0
    records = read_metrics(out)
    evals = [m for m in records if m["type"] == "eval"]
    assert [m["step"] for m in evals] == [5, 10, 12]
    assert {"loss", "text_acc", "text_perplexity", "loss_mel", "f0_cents", "voicing_acc"} <= set(evals[0])
    assert evals[0]["best"] and abs(evals[0]["text_perplexity"] - math.exp(evals[0]["loss_text"])) < 1e-6
    best = min(evals, key=lambda m: m["loss"])
    assert load_checkpoint(out / "best.pt")["step"] == best["step"]
    # The held-out file never trained: no step saw its samples.
    run = next(m for m in records if m["type"] == "run")
    assert run["files"] == len(shards) - 1


def test_evaluation_files_may_not_also_train(corpus, tmp_path):
    root, shards = corpus
    name = shards[0].name
    assert model_trainer.main(["--data-dir", str(root), "--files", name, "--eval-files", name, "--out",
                               str(tmp_path / "x"), "--ws-port", "-1", "--steps", "2", *set_flags(TINY)]) == 1


def torchrun(server_port, out, probe_dir, steps, *extra, processes=2):
    """The trainer on CPU processes under torchrun, all streaming from one Flight server."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "tests/trainer_probe.py", "--flight-host", "127.0.0.1", "--port", str(server_port),
           "--out", str(out), "--ws-port", "-1", "--steps", str(steps),
           *set_flags(TINY + ["train.checkpoint_every=4", "data.batch_size=2"]), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PROBE_DIR": str(probe_dir), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def probed(probe_dir, rank):
    return [json.loads(line) for line in (probe_dir / f"rank-{rank}.jsonl").read_text().splitlines()]


def test_context_parallel_processes_train_as_one_process_on_the_same_sequences(corpus, tmp_path):
    """train.context_parallel=2: two processes share every sequence, a slice each (equal, and a
    quarter and three quarters by train.rank_shares); their run is one process's run (the same
    batches, the same losses up to float32 summation order)."""
    _, shards = corpus
    steps = 4
    root = tmp_path / "data"   # training shards, and a held-out one whose speakers training never named
    root.mkdir()
    for shard in shards[:-1]:
        shutil.copy(shard, root)
    table = pq.read_table(shards[-1])
    meta = json.loads(table.schema.metadata[b"mmtrain"])
    meta["speakers"] = {f"stranger-{name}": i for name, i in meta["speakers"].items()}
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"mmtrain": json.dumps(meta).encode()}),
                   root / "strangers.parquet")
    held_out = ["--eval-files", "strangers.parquet", "--set", "train.eval_every=2"]
    with SampleFlightServer(root, "127.0.0.1", 0) as server:
        torchrun(server.port, tmp_path / "one", tmp_path / "probe-one", steps, *held_out, processes=1)
        torchrun(server.port, tmp_path / "split", tmp_path / "probe-split", steps, *held_out,
                 "--set", "train.context_parallel=2", processes=2)
        unequal = torchrun(server.port, tmp_path / "unequal", tmp_path / "probe-unequal", steps, *held_out,
                           "--set", "train.context_parallel=2", "--set", "train.rank_shares=[1, 3]", processes=2)
    length = load_config(str(ROOT / "config.yaml"), [], "tiny").data.max_seq_len
    assert f"slices of {length // 4}, {length - length // 4} positions" in unequal.stdout + unequal.stderr
    one = [(m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / "one") if m["type"] == "step"]
    for run in ("split", "unequal"):
        split = [(m["loss"], m["grad_norm"]) for m in read_metrics(tmp_path / run) if m["type"] == "step"]
        assert len(one) == len(split) == steps
        evaluations = [[(m["loss"], m["unseen_speakers"]) for m in read_metrics(tmp_path / name) if m["type"] == "eval"]
                       for name in ("one", run)]
        assert len(evaluations[0]) == len(evaluations[1]) == 2
        for (loss_one, unseen_one), (loss_split, unseen_split) in zip(*evaluations):
            assert unseen_one and unseen_split == unseen_one   # each segment counted once
            assert loss_split == pytest.approx(loss_one, rel=1e-4)
        # the gradient's size too: AdamW would hide a gradient scaled by the group size from the losses
        assert [value for pair in split for value in pair] == pytest.approx(
            [value for pair in one for value in pair], rel=1e-4), run
        assert probed(tmp_path / f"probe-{run}", 0) == probed(tmp_path / f"probe-{run}", 1) == probed(
            tmp_path / "probe-one", 0)


@pytest.mark.parametrize("parallel, workers", [("ddp", 0), ("fsdp", 1)])
def test_torchrun_two_ranks_train_on_disjoint_data_and_resume_exactly(corpus, tmp_path, parallel, workers):
    """With a DataLoader worker too: spawned workers have no process group of their own."""
    root, shards = corpus
    all_ids = set(pq.read_table(shards, columns=["sample_id"]).column("sample_id").to_pylist())
    steps = 8
    with SampleFlightServer(root, "127.0.0.1", 0) as server:
        straight = tmp_path / "straight"
        settings = ["--set", f"train.parallel={parallel}", "--set", f"data.num_workers={workers}"]
        torchrun(server.port, straight, tmp_path / "probe-straight", steps, *settings)
        # a second run picks up the first one's step-4 checkpoint
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        (resumed / "ckpt-00000004.pt").write_bytes((straight / "ckpt-00000004.pt").read_bytes())
        torchrun(server.port, resumed, tmp_path / "probe-resumed", steps, *settings, "--resume", "auto")

    expected = {m["step"]: m["loss"] for m in read_metrics(straight) if m["type"] == "step"}
    got = {m["step"]: m["loss"] for m in read_metrics(resumed) if m["type"] == "step"}
    assert sorted(expected) == list(range(1, steps + 1)) and sorted(got) == list(range(5, steps + 1))
    assert [got[s] for s in range(5, steps + 1)] == [expected[s] for s in range(5, steps + 1)]
    assert expected[steps] < expected[1]
    assert not (tmp_path / "straight" / "rank-1").exists()   # rank 0 alone writes the run folder
    state = load_checkpoint(straight / f"ckpt-{steps:08d}.pt")
    assert len(state["ranks"]) == 2 and state["config"]["train"]["parallel"] == parallel

    rank0, rank1 = probed(tmp_path / "probe-straight", 0), probed(tmp_path / "probe-straight", 1)
    assert len(rank0) == len(rank1) == steps      # one batch per rank and step
    for epoch in {b["epoch"] for b in rank0 + rank1}:
        ids0 = [i for b in rank0 if b["epoch"] == epoch for i in b["ids"]]
        ids1 = [i for b in rank1 if b["epoch"] == epoch for i in b["ids"]]
        assert ids0 and ids1 and not set(ids0) & set(ids1)
        assert len(set(ids0)) == len(ids0) and len(set(ids1)) == len(ids1)
        assert set(ids0) | set(ids1) <= all_ids
    # the resumed ranks continue exactly where the checkpoint left each of them
    assert probed(tmp_path / "probe-resumed", 0) == rank0[4:] and probed(tmp_path / "probe-resumed", 1) == rank1[4:]


def test_three_ranks_with_uneven_shares_read_in_proportion_and_resume_exactly(corpus, tmp_path):
    """Shares 2:1:1: process 0 accumulates two batches a step, the others one; every sample is
    read once per epoch and a resumed run continues each process exactly where it stopped."""
    root, shards = corpus
    steps = 8
    settings = ["--set", "train.rank_shares=[2, 1, 1]", "--set", "train.checkpoint_every=2"]
    with SampleFlightServer(root, "127.0.0.1", 0) as server:
        straight, resumed = tmp_path / "straight", tmp_path / "resumed"
        torchrun(server.port, straight, tmp_path / "probe-straight", steps, *settings, processes=3)
        resumed.mkdir()
        (resumed / "ckpt-00000004.pt").write_bytes((straight / "ckpt-00000004.pt").read_bytes())
        torchrun(server.port, resumed, tmp_path / "probe-resumed", steps, *settings, "--resume", "auto", processes=3)
        # resumed with other shares (recalibrated, or set by hand): the checkpoint's epoch ends as
        # it was dealt, the new shares deal the epochs after it
        other = tmp_path / "other-shares"
        other.mkdir()
        (other / "ckpt-00000006.pt").write_bytes((straight / "ckpt-00000006.pt").read_bytes())   # mid-epoch
        proc = torchrun(server.port, other, tmp_path / "probe-other", 3 * steps, *settings, "--set", "train.rank_shares=[1, 1, 2]",
                        "--resume", "auto", processes=3)
    assert "continues with the checkpoint's work; from epoch" in proc.stderr
    other_batches = [probed(tmp_path / "probe-straight", rank)[:(2, 1, 1)[rank] * 6] + probed(tmp_path / "probe-other", rank)
                     for rank in range(3)]
    other_steps = collections.Counter(m["epoch"] for m in read_metrics(other) if m["type"] == "step")
    first_epoch = probed(tmp_path / "probe-other", 0)[0]["epoch"]
    assert first_epoch in other_steps and first_epoch == probed(tmp_path / "probe-straight", 0)[2 * 6 - 1]["epoch"]
    assert len(other_steps) >= 2, "the resumed run should reach the next epoch"
    all_ids = collections.Counter(pq.read_table(shards, columns=["sample_id"]).column("sample_id").to_pylist())
    for epoch in sorted(other_steps)[:-1]:   # every finished epoch: each sample once, in the work dealt for it
        work = (2, 1, 1) if epoch == first_epoch else (1, 1, 2)
        in_epoch = [[b for b in rank if b["epoch"] == epoch] for rank in other_batches]
        assert collections.Counter(i for rank in in_epoch for b in rank for i in b["ids"]) == all_ids
        steps_in_epoch = len(in_epoch[2]) // work[2]
        assert [len(rank) for rank in in_epoch] == [w * steps_in_epoch for w in work]
    expected = {m["step"]: m["loss"] for m in read_metrics(straight) if m["type"] == "step"}
    got = {m["step"]: m["loss"] for m in read_metrics(resumed) if m["type"] == "step"}
    assert [got[s] for s in range(5, steps + 1)] == [expected[s] for s in range(5, steps + 1)]
    batches = [probed(tmp_path / "probe-straight", rank) for rank in range(3)]
    assert [len(b) for b in batches] == [2 * steps, steps, steps]
    for epoch in {b["epoch"] for rank in batches for b in rank}:
        ids = [[i for b in rank if b["epoch"] == epoch for i in b["ids"]] for rank in batches]
        flat = [i for rank in ids for i in rank]
        assert len(flat) == len(set(flat))                     # no sample twice in an epoch
    assert [probed(tmp_path / "probe-resumed", rank) for rank in range(3)] == [
        batches[0][8:], batches[1][4:], batches[2][4:]]
    state = load_checkpoint(straight / f"ckpt-{steps:08d}.pt")
    assert [r["data"]["work"] for r in state["ranks"]] == [[[0, [2, 1, 1], [2, 2, 2]]]] * 3
    run = next(m for m in read_metrics(straight) if m["type"] == "run")
    assert run["batches_per_step_by_process"] == [2, 1, 1] and run["batch_size_by_process"] == [2, 2, 2]


CFG_TINY = config.load_config(str(ROOT / "config.yaml"), ["data.batch_size=2"], "tiny")


def test_accumulated_batches_make_the_step_of_their_union(corpus):
    """Uneven batches (3 and 1 sequences) accumulated in one step give exactly the update of one
    forward over the union of their sequences: every loss term averages over the whole step."""
    _, shards = corpus
    cfg = CFG_TINY
    layout = packing.SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
    pairs, union, union_masks = step_batches(shards, layout, CFG_TINY.model, [3, 1])
    torch.manual_seed(0)
    model = CustomTransformer(cfg.model)
    model.set_corpus_stats(schema.corpus_info({str(s): schema.read_metadata(pq.read_schema(s), str(s))
                                                 for s in shards}))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad()
    reference_loss, _ = model(union, union_masks)   # the reference: one batch holding everything
    reference_loss.backward()
    gradient = {name: p.grad.clone() for name, p in model.named_parameters()}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    result = model_trainer.train_step(model, pairs, optimizer, scheduler, scaler, torch.device("cpu"),
                                      torch.float32, grad_clip=1e9)
    assert result.applied and result.loss == pytest.approx(reference_loss.item(), rel=1e-6)
    assert result.positions == union.n_positions(cfg.model.frames_per_position)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] - 0.5 * gradient[name], rtol=1e-5, atol=1e-6)


def test_tokens_per_step_sets_the_batches_accumulated_per_rank():
    cfg = config.load_config(None, ["data.batch_size=4", "data.max_seq_len=1000", "train.tokens_per_step=16000"])
    assert planning.accumulation_steps(cfg, world=1) == 4
    assert planning.accumulation_steps(cfg, world=2) == 2
    assert planning.accumulation_steps(cfg, world=8) == 1   # never fewer than one batch
    assert planning.accumulation_steps(config.load_config(None, []), world=1) == 1
    with pytest.raises(ValueError, match="train.parallel='zero'"):
        config.load_config(None, ["train.parallel=zero"])


def test_mfu_needs_a_known_peak():
    assert parallel.peak_flops(torch.device("cpu"), torch.float32) is None
    cfg = config.load_config(str(ROOT / "config.yaml"), [], "base")
    with torch.device("meta"):
        model = CustomTransformer(cfg.model)
    block_weights = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    assert model.flops_per_position(1) > 6 * block_weights   # and the attention term grows with length,
    local_only = CustomTransformer(dataclasses.replace(cfg.model, layer_pattern="L", n_layers=2))
    assert local_only.flops_per_position(10 * cfg.model.window) == local_only.flops_per_position(100 * cfg.model.window)


def test_a_run_with_accumulation_consumes_that_many_batches_per_step(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    consumed = []
    record = datasets._PackedStream.record
    monkeypatch.setattr(datasets._PackedStream, "record", lambda self, batch: (consumed.append(batch), record(self, batch)))
    out = tmp_path / "accumulate"
    # tiny: batches of 2 x 256 positions; 1,500 positions per step -> 3 batches
    assert model_trainer.main(["--data-dir", str(root), "--out", str(out), "--ws-port", "-1", "--steps", "4",
                               *set_flags(TINY + ["data.batch_size=2", "train.tokens_per_step=1500"])]) == 0
    messages = read_metrics(out)
    assert messages[0]["batches_per_step"] == 3 and len(consumed) == 12
    steps = [m for m in messages if m["type"] == "step"]
    positions = [b.n_positions(4) for b in consumed]
    for i, step in enumerate(steps):
        assert step["tokens_per_s"] * step["step_time_s"] == pytest.approx(sum(positions[3 * i:3 * i + 3]))
        assert step["peak_mem_gb"] > 0 and step["mfu"] is None   # no MFU on a CPU


def test_sigterm_to_torchrun_stops_both_ranks_at_the_same_step_with_a_checkpoint(corpus, tmp_path):
    root, _ = corpus
    probe, out = tmp_path / "probe", tmp_path / "run"
    probe.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "tests/trainer_probe.py",
         "--data-dir", str(root), "--out", str(out), "--ws-port", "-1", "--steps", "400", *set_flags(TINY)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PROBE_DIR": str(probe), "OMP_NUM_THREADS": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"type": "step"') >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)   # torchrun passes it on to both ranks
    proc.wait(timeout=120)             # torchrun itself reports the signal with a non-zero exit
    messages = read_metrics(out)
    last = max(m["step"] for m in messages if m["type"] == "step")
    assert last < 400 and messages[-1]["type"] == "finished"
    assert (out / f"ckpt-{last:08d}.pt").exists()
    assert len(probed(probe, 0)) == len(probed(probe, 1)) == last   # both ranks stopped after the same step


def test_the_run_keeps_its_speaker_map_and_reports_unseen_eval_speakers_apart(corpus, tmp_path, capsys):
    root, shards = corpus
    data = tmp_path / "data"
    shutil.copytree(root, data)
    held_out = data / shards[-1].name
    table = pq.read_table(held_out)
    meta = json.loads(table.schema.metadata[b"mmtrain"])
    by_id = {i: name for name, i in meta["speakers"].items()}
    renamed_id = int(table.column("speaker_id")[0].as_py())
    meta["speakers"][by_id[renamed_id]] = meta["speakers"].pop(by_id[renamed_id])
    meta["speakers"] = {("stranger" if i == renamed_id else name): i for name, i in meta["speakers"].items()}
    pq.write_table(table.replace_schema_metadata({b"mmtrain": json.dumps(meta).encode()}), held_out)
    out = tmp_path / "run"
    assert model_trainer.main(["--data-dir", str(data), "--eval-files", held_out.name, "--out", str(out),
                               "--ws-port", "-1", "--steps", "3", *set_flags(TINY)]) == 0
    training_names = sorted({name for s in shards[:-1] for name in
                             json.loads(pq.read_schema(s).metadata[b"mmtrain"])["speakers"]})
    state = load_checkpoint(out / "ckpt-00000003.pt")
    assert state["labels"]["speakers"] == training_names and "stranger" not in training_names
    evals = [m for m in read_metrics(out) if m["type"] == "eval"]
    stranger_rows = sum(int(v) == renamed_id for v in table.column("speaker_id").to_pylist())
    assert evals[-1]["unseen_speakers"] == {"stranger": stranger_rows}
    assert "of speakers unseen in training (stranger) were not scored" in capsys.readouterr().err


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_uneven_ranks_make_the_step_of_one_process_on_the_union(corpus, tmp_path, parallel):
    """2 CPU ranks with shares 3:1 (DDP: three batches against one; FSDP: one batch each, three
    times the sequences) update the weights exactly as one process stepping on their union."""
    root, shards = corpus
    out = tmp_path / "after.pt"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "tests/uneven_step_probe.py", str(root), str(out), parallel], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    distributed = torch.load(out, weights_only=True)
    cfg = CFG_TINY
    layout = packing.SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
    _, union, masks = step_batches(sorted(root.glob("*.parquet")), layout, cfg.model,
                                   {"ddp": [1, 2, 1, 2], "fsdp": [3, 1]}[parallel])
    torch.manual_seed(0)
    model = CustomTransformer(cfg.model)
    model.set_corpus_stats(schema.corpus_info({str(s): schema.read_metadata(pq.read_schema(s), str(s))
                                                 for s in sorted(root.glob("*.parquet"))}))
    loss, _ = model(union, masks)
    loss.backward()
    assert distributed["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(distributed["weights"][name], (p - 0.5 * p.grad).detach(), rtol=1e-6, atol=1e-6)


def test_resuming_with_another_model_shape_names_the_settings_that_restore_it(corpus, tmp_path, capsys):
    root, _ = corpus
    flags = ["--data-dir", str(root), "--out", str(tmp_path / "run"), "--ws-port", "-1", "--steps", "2", *set_flags(TINY)]
    assert model_trainer.main(flags) == 0
    capsys.readouterr()
    assert model_trainer.main(flags[:5] + ["4", "--resume", "auto", *set_flags(TINY + ["model.layer_pattern=LG"])]) == 1
    err = capsys.readouterr().err
    assert "holds a model of another shape than this run's config: resume with --set model.layer_pattern=LS" in err


def test_resume_auto_says_what_it_found(corpus, tmp_path, capsys):
    root, _ = corpus
    out = tmp_path / "run"
    settings = TINY + ["train.warmup_steps=1"]

    def flags(steps):
        return ["--data-dir", str(root), "--out", str(out), "--ws-port", "-1", "--steps", str(steps),
                *set_flags(settings), "--resume", "auto"]

    assert model_trainer.main(flags(2)) == 0
    err = capsys.readouterr().err
    assert f"--resume auto: no checkpoint in {out}: starting at step 0" in err
    assert f"checkpoints: {out.resolve()}" in err
    assert model_trainer.main(flags(3)) == 0
    err = capsys.readouterr().err
    assert f"resumed from {out / 'ckpt-00000002.pt'} at step 2" in err
    cfg = config.load_config(str(config.DEFAULT_CONFIG), settings, "tiny")   # the change, in numbers
    before, after = (c.lr * model_trainer.lr_factor(2, c) for c in (dataclasses.replace(cfg.train, steps=2),
                                                                   dataclasses.replace(cfg.train, steps=3)))
    assert (f"note: the checkpoint's run planned 2 steps at lr {cfg.train.lr:g}; this one 3 at lr {cfg.train.lr:g}: "
            f"the schedule is recomputed, so the learning rate at step 2 goes from {before:.3g} to {after:.3g}") in err
    assert before != after


def test_resume_auto_refuses_when_another_machine_holds_newer_checkpoints(tmp_path, monkeypatch):
    """Several machines under torchrun: rank 0 reads checkpoints from its own disk only."""
    (tmp_path / "ckpt-00000005.pt").write_bytes(b"")
    seen = [("box-a", "ckpt-00000005.pt"), ("box-a", ""), ("box-b", "ckpt-00000020.pt"), ("box-b", "")]
    monkeypatch.setattr(training_run, "all_ranks", lambda value: seen)
    with pytest.raises(ValueError, match=r"--resume auto: .* on box-b \(rank 2\) holds ckpt-00000020.pt, but rank 0 "
                                         r"runs on box-a, which has ckpt-00000005.pt there: only rank 0 reads "
                                         r"checkpoints. Start rank 0 on box-b"):
        training_run.check_checkpoints_reach_rank0(tmp_path, Ranks())
    seen[2] = ("box-b", "ckpt-00000004.pt")   # older: rank 0 has the newest
    training_run.check_checkpoints_reach_rank0(tmp_path, Ranks())


def test_the_trainer_reads_from_several_data_servers(corpus, tmp_path):
    root, shards = corpus
    halves = tmp_path / "a", tmp_path / "b"
    for folder, chosen in zip(halves, (shards[:2], shards[1:])):
        folder.mkdir()
        for shard in chosen:
            (folder / shard.name).write_bytes(shard.read_bytes())
    with SampleFlightServer(halves[0], "127.0.0.1", 0) as a, SampleFlightServer(halves[1], "127.0.0.1", 0) as b:
        out = tmp_path / "run"
        assert model_trainer.main(["--flight-host", f"127.0.0.1:{a.port}", "127.0.0.1", "--port", str(b.port),
                                   "--out", str(out), "--ws-port", "-1", "--steps", "2", *set_flags(TINY)]) == 0
    run = next(m for m in read_metrics(out) if m["type"] == "run")
    assert run["files"] == len(shards)   # the union, the shared file once
