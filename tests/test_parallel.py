"""Scale-out pieces: work per rank from measured speeds, and a run on simulated unequal cards."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import model_trainer
import parallel

ROOT = Path(__file__).resolve().parents[1]


def test_shares_follow_the_measured_speeds():
    assert parallel.shares_from_speeds([1000.0, 1000.0, 210.0, 190.0]) == [5, 5, 1, 1]
    assert parallel.shares_from_speeds([500.0, 1000.0]) == [1, 2]
    assert parallel.shares_from_speeds([1e6, 1.0]) == [16, 1]        # capped: a stalled card still takes one


@pytest.mark.parametrize("parallel_mode, expected", [("ddp", ([6, 2], [2, 2])), ("fsdp", ([2, 2], [6, 2]))])
def test_a_share_multiplies_batches_under_ddp_and_batch_size_under_fsdp(parallel_mode, expected):
    cfg = model_trainer.load_config(None, ["data.batch_size=2", "data.max_seq_len=100", "train.tokens_per_step=1600",
                                           "train.rank_shares=[3, 1]", f"train.parallel={parallel_mode}"])
    assert parallel.rank_work(cfg, 2) == expected                   # 1600 / (2 x 100 x 4 shares) = 2 a share
    with pytest.raises(ValueError, match="train.rank_shares has 2 entries for 3 process"):
        parallel.rank_work(cfg, 3)
    with pytest.raises(ValueError, match="auto measures each process alone"):
        model_trainer.load_config(None, ["train.rank_shares=auto", "train.parallel=fsdp"])


def test_auto_shares_measure_a_slow_card_and_give_it_less(corpus, tmp_path):
    """Two CPU processes, the second made three times slower: auto shares give the first more
    batches a step than the second's one, and the run trains."""
    root, _ = corpus
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "bench/simulated_ranks.py", "--data-dir", str(root), "--out", str(out), "--steps", "4", "--preset", "tiny",
         "--ws-port", "-1", "--set", "train.rank_shares=auto"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SIM_SPEEDS": "1,0.33", "SIM_BATCH_SECONDS": "0.15"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    shares = json.loads(re.search(r"-> shares (\[.*\])", proc.stderr).group(1))
    assert shares[1] == 1 and shares[0] >= 2          # about 3 (sleeps), less where the real compute counts
    assert f"process 0: cpu (float32), {shares[0]} batch(es)" in proc.stderr
    run = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"run"' in line)
    assert run["batches_per_step_by_process"] == shares
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"type": "step"' in line]) == 4
