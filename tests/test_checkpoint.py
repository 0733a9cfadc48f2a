"""Checkpoint files: atomic writes, damaged files passed over."""
import signal
import subprocess
import sys
from pathlib import Path

import torch

import checkpoint

ROOT = Path(__file__).resolve().parents[1]


KILL_DURING_WRITE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import checkpoint
out = checkpoint.Path({out!r})
checkpoint.save_checkpoint(out, {{"step": 1, "weights": torch.ones(1000)}}, keep=3)
real_save = torch.save
def dying_save(obj, f):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
checkpoint.save_checkpoint(out, {{"step": 2, "weights": torch.zeros(1000)}}, keep=3)
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE.format(root=str(ROOT), out=str(out))],
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "ckpt-00000002.pt").exists()          # the half-written file never took the name
    assert (out / "ckpt-00000002.pt.tmp").exists()
    found, state = checkpoint.newest_checkpoint(out)
    assert found == out / "ckpt-00000001.pt"
    assert torch.equal(state["weights"], torch.ones(1000))
    # A damaged newest checkpoint (a disk error, a copy cut short) is passed over too.
    (out / "ckpt-00000003.pt").write_bytes(b"garbage")
    assert checkpoint.newest_checkpoint(out)[0] == out / "ckpt-00000001.pt"
