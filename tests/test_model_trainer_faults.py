"""Every way a run ends keeps its work: data that stays away, signals while waiting for it, a full
disk, damaged checkpoints, Ctrl-C with DataLoader workers. Each fault is injected for real: a
server shut down, a signal sent, a write that fails with ENOSPC, a flipped byte."""
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import checkpoint
import model_trainer
from custom_transformer import CustomTransformer
from flight_server import SampleFlightServer
from util import wait_for

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--set", "train.warmup_steps=5", "--set", "train.lr=0.003"]


def flags(*items):
    return TINY + [arg for item in items for arg in ("--set", item)]


def metrics(out):
    """The run's messages so far (a line the trainer is still writing is left for later)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")] \
        if path.exists() else []


def steps_logged(out):
    return [m for m in metrics(out) if m["type"] == "step"]


def trainer(port, out, steps, *extra, **popen):
    return subprocess.Popen(
        [sys.executable, "model_trainer.py", "--flight-host", "127.0.0.1", "--port", str(port), "--out", str(out),
         "--ws-port", "-1", "--steps", str(steps), *flags("train.checkpoint_every=100", "data.retry_backoff_s=0.05",
                                                          "data.max_retries=3"), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_data_that_stays_away_ends_the_run_with_a_checkpoint_that_resumes_exactly(corpus, tmp_path):
    root, _ = corpus
    server = SampleFlightServer(root, "127.0.0.1", 0)
    port, steps = server.port, 30
    try:
        straight = trainer(port, tmp_path / "straight", steps)
        assert straight.wait(timeout=300) == 0, straight.stderr.read()[-3000:]
        expected = [m["loss"] for m in steps_logged(tmp_path / "straight")]

        out = tmp_path / "failed"
        failing = trainer(port, out, steps)
        assert wait_for(lambda: len(steps_logged(out)) >= 4, timeout=240)
        server.shutdown()                                   # the data box goes away and stays away
        _, stderr = failing.communicate(timeout=120)
        assert failing.returncode == 1
        last = max(m["step"] for m in steps_logged(out))
        assert last < steps
        assert re.search(r"retry 1 of 3 in [\d.]+ s", stderr), stderr[-3000:]     # retries say what they do
        assert f"the checkpoint of step {last}" in stderr and "--resume auto" in stderr, stderr[-3000:]
        assert "Traceback" not in stderr
        assert checkpoint.load_checkpoint(out / f"ckpt-{last:08d}.pt")["step"] == last
        assert metrics(out)[-1]["type"] == "failed"

        server = SampleFlightServer(root, "127.0.0.1", port)  # back on the same address
        resumed = trainer(port, out, steps, "--resume", "auto")
        assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    finally:
        server.shutdown()
    losses = {m["step"]: m["loss"] for m in steps_logged(out)}
    assert [losses[s] for s in range(1, steps + 1)] == expected   # bitwise on CPU: nothing lost or repeated


def test_a_signal_while_waiting_for_data_stops_at_once_with_a_checkpoint(corpus, tmp_path):
    root, _ = corpus
    server = SampleFlightServer(root, "127.0.0.1", 0)
    out = tmp_path / "run"
    waiting = trainer(server.port, out, 400, "--set", "data.max_retries=50", "--set", "data.retry_backoff_s=30")
    try:
        assert wait_for(lambda: len(steps_logged(out)) >= 3, timeout=240)
    finally:
        server.shutdown()
    # the prefetched batches run out; the reader is backing off, and the run says it waits
    assert wait_for(lambda: any(m["type"] == "status" and m["state"] == "waiting for data" for m in metrics(out)),
                    timeout=240)
    last = max(m["step"] for m in steps_logged(out))
    sent = time.monotonic()
    waiting.send_signal(signal.SIGTERM)
    _, stderr = waiting.communicate(timeout=120)   # read while it runs: a full pipe would block its exit
    assert waiting.returncode == 0, stderr[-3000:]
    # Within the first 30 s wait, not after it (about a second on a quiet machine).
    assert time.monotonic() - sent < 25.0
    assert "asked to stop while waiting for data" in stderr and "retry 2 of 50" not in stderr
    assert max(m["step"] for m in steps_logged(out)) == last
    assert (out / f"ckpt-{last:08d}.pt").exists()
    # The live feed (metrics.jsonl alike) said the run was waiting, since when, then checkpointing.
    told = [m for m in metrics(out) if m["type"] == "status" and m["step"] == last]
    assert [m["state"] for m in told] == ["waiting for data", "checkpointing"], told
    assert told[0]["since"] <= time.time()


def test_a_signal_during_setup_exits_cleanly(tmp_path):
    """The data box is down at start: the trainer retries its listing; SIGTERM ends that at once."""
    dead_port = 9   # discard: nothing listens
    proc = trainer(dead_port, tmp_path / "run", 10, "--set", "data.max_retries=50", "--set", "data.retry_backoff_s=30")
    assert wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists(), timeout=120)
    time.sleep(1.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert time.monotonic() - sent < 25.0   # within the first 30 s wait (about a second on a quiet machine)
    stderr = proc.stderr.read()
    assert "stopped before training began (signal SIGTERM during setup): nothing to save" in stderr
    assert "retry 2 of" not in stderr


def test_ctrl_c_with_dataloader_workers_exits_promptly(corpus, tmp_path):
    """Ctrl-C reaches the whole process group: the worker dies too, and the reader with it."""
    root, _ = corpus
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "model_trainer.py", "--data-dir", str(root), "--out", str(out), "--ws-port", "-1",
         "--steps", "400", *flags("data.num_workers=1", "train.checkpoint_every=100")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert wait_for(lambda: len(steps_logged(out)) >= 3, timeout=240)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    assert time.monotonic() - sent < 50.0, "shutdown waited on a blocked reader"   # about 5 s on a quiet machine

    def group_gone():
        try:
            os.killpg(proc.pid, 0)
            return False
        except ProcessLookupError:
            return True

    assert wait_for(group_gone, timeout=60), "a process of the run (its DataLoader worker) outlived it"
    last = max(m["step"] for m in steps_logged(out))
    assert (out / f"ckpt-{last:08d}.pt").exists()


def test_a_signal_stops_after_the_step_that_is_running(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    original, calls = CustomTransformer.forward, []

    def forward(self, batch, masks, *rest, **options):   # SIGTERM arrives in the middle of step 3
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, masks, *rest, **options)

    monkeypatch.setattr(CustomTransformer, "forward", forward)
    out = tmp_path / "run"
    assert model_trainer.main(["--data-dir", str(root), "--out", str(out), "--ws-port", "-1", "--steps", "20",
                               *flags()]) == 0
    assert [m["step"] for m in steps_logged(out)] == [1, 2, 3]
    assert sorted(p.name for p in out.glob("ckpt-*.pt")) == ["ckpt-00000003.pt"]


class FullDisk(io.FileIO):
    """A file on a disk with no room left: writes fail with ENOSPC, as a real disk reports it."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def disk_full_for(monkeypatch, full):
    """Checkpoint files whose path satisfies `full(path)` meet a full disk."""
    monkeypatch.setattr(checkpoint, "open", lambda path, mode="r", *args, **kwargs:
                        FullDisk(path, mode) if full(str(path)) else open(path, mode, *args, **kwargs), raising=False)


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    root, _ = corpus
    disk_full_for(monkeypatch, lambda path: "ckpt-00000003" not in path)
    out = tmp_path / "run"
    assert model_trainer.main(["--data-dir", str(root), "--out", str(out), "--ws-port", "-1", "--steps", "9",
                               *flags("train.checkpoint_every=3")]) == 1
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert re.search(rf"cannot write checkpoint ckpt-00000006\.pt in {re.escape(str(out))}: No space left on device "
                     r"\(it needs about [\d,]+ MiB; [\d,]+ MiB free there\)\. Stopped at step 6; the last good "
                     r"checkpoint is .*ckpt-00000003\.pt \(step 3\)", line), err
    assert "Traceback" not in err and "inline_container" not in err
    assert not list(out.glob("*.tmp"))                       # the partial file is gone
    assert [p.name for p in out.glob("ckpt-*.pt")] == ["ckpt-00000003.pt"]
    assert checkpoint.load_checkpoint(out / "ckpt-00000003.pt")["step"] == 3


def test_a_full_disk_can_be_ridden_out_until_the_next_interval(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    disk_full_for(monkeypatch, lambda path: "ckpt-00000006" in path)
    out = tmp_path / "run"
    assert model_trainer.main(["--data-dir", str(root), "--out", str(out), "--ws-port", "-1", "--steps", "9",
                               *flags("train.checkpoint_every=3", "train.on_checkpoint_error=continue")]) == 0
    assert sorted(p.name for p in out.glob("ckpt-*.pt")) == ["ckpt-00000003.pt", "ckpt-00000009.pt"]
    failed = [m for m in metrics(out) if m["type"] == "checkpoint_failed"]
    assert [m["step"] for m in failed] == [6] and "No space left on device" in failed[0]["error"]
    assert not list(out.glob("*.tmp"))


def test_resume_auto_passes_over_a_corrupted_checkpoint_and_says_so(corpus, tmp_path, capsys):
    root, _ = corpus
    out = tmp_path / "run"
    args = ["--data-dir", str(root), "--out", str(out), "--ws-port", "-1", *flags("train.checkpoint_every=2")]
    assert model_trainer.main([*args, "--steps", "4"]) == 0
    newest = out / "ckpt-00000004.pt"
    weights = checkpoint.load_checkpoint(newest)["model"]
    name, tensor = max(weights.items(), key=lambda item: item[1].numel())
    raw = bytearray(newest.read_bytes())
    at = raw.find(tensor.numpy().tobytes()[:64])
    assert at > 0
    raw[at + 100] ^= 0x10                                    # one flipped bit inside a weight
    newest.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointCorrupt, match="checksum mismatch"):
        checkpoint.load_checkpoint(newest)
    capsys.readouterr()
    assert model_trainer.main([*args, "--steps", "5", "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}: checksum mismatch" in err
    assert "resumed from" in err and "ckpt-00000002.pt at step 2" in err


def test_resume_auto_with_no_readable_checkpoint_says_why_and_how_to_start_afresh(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt-00000004.pt").write_bytes(b"")
    (out / "ckpt-00000008.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    assert model_trainer.main(["--data-dir", str(tmp_path / "unused"), "--out", str(out), "--ws-port", "-1",
                               "--resume", "auto", *flags()]) == 1
    err = capsys.readouterr().err
    assert "none of the 2 checkpoint(s)" in err and "can be read" in err
    assert "ckpt-00000004.pt: empty file (0 bytes)" in err and "ckpt-00000008.pt: not a loadable checkpoint" in err
    assert "To start afresh, move them out of" in err and "pass --resume auto" not in err
    assert ": \n" not in err and not re.search(r": $", err, re.M)


def test_an_unwritable_out_folder_fails_before_any_data_or_model_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    started = time.monotonic()
    assert model_trainer.main(["--data-dir", str(tmp_path / "no-such-data"), "--out", str(blocker / "run"),
                               "--ws-port", "-1", *flags()]) == 1
    err = capsys.readouterr().err
    assert f"--out {blocker / 'run'}: cannot write there" in err and "no-such-data" not in err
    assert time.monotonic() - started < 10


def test_under_torchrun_every_rank_abandons_the_step_together_when_data_fails(corpus, tmp_path):
    """Each rank reads its own shard, so one may fail while the others are already inside the
    step's collectives: it must join them (with padding) rather than leave them hanging."""
    root, _ = corpus
    server = SampleFlightServer(root, "127.0.0.1", 0)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "model_trainer.py",
         "--flight-host", "127.0.0.1", "--port", str(server.port), "--out", str(out), "--ws-port", "-1",
         "--steps", "400", *flags("data.max_retries=2", "data.retry_backoff_s=0.05", "train.checkpoint_every=100")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert wait_for(lambda: len(steps_logged(out)) >= 4, timeout=240)
    finally:
        server.shutdown()
    assert proc.wait(timeout=120) != 0
    stderr = proc.stderr.read()
    last = max(m["step"] for m in steps_logged(out))
    assert stderr.count(f"The run stopped with the checkpoint of step {last}") == 2, stderr[-3000:]   # both ranks
    assert checkpoint.load_checkpoint(out / f"ckpt-{last:08d}.pt")["step"] == last
