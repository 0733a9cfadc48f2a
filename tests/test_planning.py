"""Work per process: from measured speeds and memory, rebalanced, and runs on simulated unequal cards."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import config
import planning

ROOT = Path(__file__).resolve().parents[1]


def test_work_follows_the_measured_speeds_within_each_cards_memory():
    # 2 fast cards holding 4 sequences a batch, 2 at a fifth of the speed holding 1: 24 sequences a step
    per_step, sizes = planning.work_from_speeds([1000.0, 1000.0, 200.0, 200.0], [4, 4, 1, 1], 24)
    assert per_step == [3, 3, 2, 2] and sizes == [3, 3, 1, 1]     # 10 sequences in batches of <= 4: 3 x 3
    assert planning.imbalance(per_step, sizes, [1000.0, 1000.0, 200.0, 200.0]) < 1.06
    assert planning.work_from_speeds([500.0, 1000.0], [8, 8], 2) == ([1, 1], [1, 2])   # the slowest takes one at least
    assert planning.work_from_speeds([1e6, 1.0], [4, 4], 2) == ([4, 1], [4, 1])       # at most 16 times its share
    assert planning.imbalance([1, 1], [2, 2], [2.0, 1.0]) == pytest.approx(4 / 3)


def test_rebalancer_proposes_only_a_clearly_better_plan():
    rebalancer = planning.Rebalancer([4, 4], total_sequences=4, every=3)
    rebalancer.add(3000, 1.0)   # one process: its speed is all there is, so equal work stays
    assert rebalancer.propose(2, [1], [4]) is None and rebalancer.positions == 3000   # not at a 3rd step
    assert rebalancer.propose(3, [1], [4]) is None and rebalancer.positions == 0


def test_compute_leaves_out_the_wait_for_other_ranks():
    assert planning.compute_seconds([1.0, 1.0], [2.5, 2.5], world=1) == 7.0
    # the last backward (9 s: it waited for the others' gradients) counts as its forward x 2.5
    assert planning.compute_seconds([1.0, 1.0, 2.0], [2.5, 2.5, 9.0], world=2) == pytest.approx(1 + 1 + 2 + 5 + 5)
    assert planning.compute_seconds([2.0], [9.0], world=2) == 6.0   # no earlier batch: backward = 2 x forward


@pytest.mark.parametrize("parallel_mode, expected", [("ddp", ([6, 2], [2, 2])), ("fsdp", ([2, 2], [6, 2]))])
def test_a_share_multiplies_batches_under_ddp_and_batch_size_under_fsdp(parallel_mode, expected):
    cfg = config.load_config(None, ["data.batch_size=2", "data.max_seq_len=100", "train.tokens_per_step=1600",
                                           "train.rank_shares=[3, 1]", f"train.parallel={parallel_mode}"])
    assert planning.rank_work(cfg, 2) == expected                   # 1600 / (2 x 100 x 4 shares) = 2 a share
    with pytest.raises(ValueError, match="train.rank_shares has 2 entries for 3 process"):
        planning.rank_work(cfg, 3)
    with pytest.raises(ValueError, match="auto measures each process alone"):
        config.load_config(None, ["train.rank_shares=auto", "train.parallel=fsdp"])


def simulated_run(out, root, speeds, *flags, steps=4, **env):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(len(speeds.split(","))),
         "bench/simulated_ranks.py", "--data-dir", str(root), "--out", str(out), "--steps", str(steps), "--preset",
         "tiny", "--ws-port", "-1", "--set", "train.rank_shares=auto", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SIM_SPEEDS": speeds, "SIM_BATCH_SECONDS": "0.15", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_auto_shares_measure_a_slow_card_and_give_it_less(corpus, tmp_path):
    """Two CPU processes, the second made five times slower and holding one sequence a batch
    where the first holds two: the first takes more sequences a step, in batches its memory
    holds, and the run trains."""
    root, _ = corpus
    proc, messages = simulated_run(tmp_path / "run", root, "1,0.2", "--set", "data.batch_size=2",
                                   SIM_MOST_SEQUENCES="2,1")
    per_step, sizes = (json.loads(x) for x in re.search(r"-> batches (\[.*\]) of (\[.*\]) sequences", proc.stderr).groups())
    assert sizes[1] == 1 and sizes[0] <= 2 and per_step[1] == 1
    assert per_step[0] * sizes[0] >= 2 * per_step[1] * sizes[1]   # about 5 (sleeps), less where the real compute counts
    assert f"process 0: cpu (float32, 1 CPU thread(s)), {per_step[0]} batch(es) x {sizes[0]} x" in proc.stderr
    run = next(m for m in messages if m["type"] == "run")
    assert run["batches_per_step_by_process"] == per_step and run["batch_size_by_process"] == sizes
    assert len([m for m in messages if m["type"] == "step"]) == 4


def test_a_card_that_slows_down_gets_less_work_from_the_next_epoch(corpus, tmp_path):
    """Equal cards at the start; after a few steps the second runs twenty times slower (so much
    that the real compute of a busy machine, shared by both, cannot hide it). The rebalancer
    measures it and gives the first more batches from the next epoch (step 14) on."""
    root, _ = corpus
    proc, messages = simulated_run(tmp_path / "run", root, "1,1", "--set", "data.batch_size=1",
                                   "--set", "train.rebalance_every=2", steps=16,
                                   SIM_SPEEDS_LATER="1,0.05", SIM_CHANGE_AFTER="6")
    run = next(m for m in messages if m["type"] == "run")
    assert run["batches_per_step_by_process"] == [1, 1]
    rebalance = next(m for m in messages if m["type"] == "rebalance")
    speeds = rebalance["positions_per_s_by_process"]
    assert speeds[0] > 2 * speeds[1]
    assert rebalance["batches_per_step_by_process"][0] >= 2 * rebalance["batches_per_step_by_process"][1]
    later = [m for m in messages if m["type"] == "step" and m["epoch"] >= rebalance["from_epoch"]]
    assert later, "the run should reach the epoch the new plan starts"
    assert "from epoch" in proc.stderr


def test_the_faster_precision_is_measured_on_the_card(monkeypatch):
    """A card before sm_80 with precision auto: fp16 and fp32 are both timed, the faster one
    trains (here on CPU, fp32 against bf16, with the measured speeds made unequal by hand)."""
    import torch
    from custom_transformer import CustomTransformer
    from packing import SequenceLayout
    cfg = config.load_config(str(ROOT / "config.yaml"), [], "tiny")
    model = CustomTransformer(cfg.model)
    layout = SequenceLayout(64, cfg.model.frames_per_position)
    chosen, speeds = planning.faster_precision(model, layout, 1, torch.device("cpu"), (torch.float32, torch.bfloat16))
    assert set(speeds) == {torch.float32, torch.bfloat16} and all(v > 0 for v in speeds.values())
    assert chosen == max(speeds, key=speeds.get)
    measured = {torch.float16: 900.0, torch.float32: 2500.0}   # a P40: fp16 arithmetic is slow there
    monkeypatch.setattr(planning, "measure_speed", lambda model, probe, masks, device, dtype: measured[dtype])
    assert planning.faster_precision(model, layout, 1, torch.device("cpu"))[0] == torch.float32
    assert not planning.needs_precision_probe(torch.device("cpu"), "auto")


def test_context_parallel_slices_follow_the_shares_given_or_measured(monkeypatch):
    """A group of 4 (ranks 4-7 of 8): by hand, its processes' entries of train.rank_shares;
    auto on CPUs, in proportion to each process's measured speed."""
    from context_parallel import SequenceSlices
    from parallel import Ranks
    import torch
    ranks = Ranks(rank=5, world=8, context=SequenceSlices(None, 1, 4))
    cfg = config.load_config(str(ROOT / "config.yaml"), ["train.rank_shares=[1, 1, 1, 1, 3, 1, 2, 2]"], "tiny")
    assert planning.context_shares(cfg, ranks, None, torch.device("cpu"), torch.float32, print) == (3, 1, 2, 2)
    speeds = [1.0, 1.0, 1.0, 1.0, 3000.0, 1000.0, 1500.0, 1500.0]
    monkeypatch.setattr(planning, "measure_speed", lambda *args: speeds[5])
    # every process reports what this one does: (its speed, its memory or, on a CPU, its speed again)
    monkeypatch.setattr(planning, "all_ranks", lambda value: [(s, s * value[1] / value[0]) for s in speeds])
    said = []
    cfg = config.load_config(str(ROOT / "config.yaml"), ["train.rank_shares=auto"], "tiny")
    shares = planning.context_shares(cfg, ranks, torch.nn.Linear(1, 1), torch.device("cpu"), torch.float32, said.append)
    assert shares == (100, 33, 50, 50) and "slices in shares [100, 33, 50, 50]" in said[0]
    cfg = config.load_config(str(ROOT / "config.yaml"), [], "tiny")
    assert planning.context_shares(cfg, ranks, None, torch.device("cpu"), torch.float32, print) == ()
