"""The memory plan: its cost model recovers known terms, predicts a probe it was not fitted on
within a tenth, and says which option fits which card."""
import pytest

import memory_plan
import model_trainer
from config import DEFAULT_CONFIG, load_config

def test_fit_recovers_the_per_position_terms():
    """A window layer's working set with negative fixed costs (its share per position rises with
    length), a sparse layer's with positive ones (its share falls): both straight lines."""
    kept = 3000.0
    working = {"L": (50000.0, -2e7), "S": (60000.0, 3e8)}
    measured = {kind: {(layers, n): (n * layers * kept + a * n + c, n * (layers * kept + 700.0))
                       for layers, n in ((1, 2048), (2, 2048), (1, 4096))}
                for kind, (a, c) in working.items()}
    model = memory_plan.fit(measured)
    assert abs(model.kept_per_layer - kept) < 1e-6
    for kind, (a, c) in working.items():
        assert abs(model.working[kind][0] - a) < 1e-6 and abs(model.working[kind][1] - c) < 1e-3
    assert abs(model.working_bytes(1000) - (60000.0 * 1000 + 3e8)) < 1e-3
    assert abs(model.activations(12, 10000) - (10000 * 12 * kept + 60000.0 * 10000 + 3e8)) < 1e-3
    assert abs(model.activations(12, 10000, offloaded=True) - (10000 * kept + 60000.0 * 10000 + 3e8)) < 1e-3


def test_fit_shared_parts_a_sharing_process_working_set_into_its_slice_s_and_the_whole_rows():
    """Split over 2 and over 4 processes, one layer's peak is its slice's checkpoint plus a
    working set of 40 KB a position of its slice, 5 KB a position of the rows, 8e7 bytes divided
    and 1e7 whole: the fit recovers them, and plans 8 processes with 12 layers from them."""
    kept = 3000.0
    model = memory_plan.MemoryModel(kept, {"L": (50000.0, 0.0)})
    measured = {split: {"L": {(1, n): (n / split * (kept + 40000.0) + 5000.0 * n + 8e7 / split + 1e7, 0.0)
                              for n in (2048, 4096)}} for split in (2, 4)}
    shared = memory_plan.fit_shared(model, measured)
    for got, expected in zip(shared.shared["L"], (40000.0, 5000.0, 8e7, 1e7)):
        assert abs(got - expected) < 1e-6 * expected
    assert abs(shared.activations(12, 65536, sharing=8)
               - (8192 * 12 * kept + 8192 * 40000.0 + 5000.0 * 65536 + 1e7 + 1e7)) < 1e-3 * 65536
    assert shared.activations(12, 65536) == model.activations(12, 65536)   # one process: the one-process model
    with pytest.raises(ValueError, match="without probes split"):
        model.activations(12, 65536, sharing=8)


def test_the_fitted_model_predicts_a_longer_deeper_probe_within_a_tenth():
    """Fitted on one and two layers of each kind at the plan's probe lengths (3,072 and 6,144
    for `tiny`; with context parallelism, one layer split over 2 and over 4 processes at 16,384
    and 32,768), checked on its pattern's four layers (L, S, L, S) at 65,536 positions,
    measured: on one process, and on the largest of 4 sharing the sequence (measured 1.00x and
    0.98x; the plan leaves a tenth of each card for the allocator). Planned for 8 from the same
    splits it read 0.94x here (0.89x on CI) at this tiny width, 0.97x at `base` width
    (bench/memory_plan_check.py): extrapolating in the number of processes is the weaker part."""
    config = str(DEFAULT_CONFIG)
    options = ["model.activation_checkpointing=true"]
    cfg = load_config(config, [], "tiny")
    short, long_ = memory_plan.probe_lengths(cfg)
    measured = {kind: memory_plan.probe([], "tiny", config, [*options, f"model.layer_pattern={kind}"],
                                        [(1, short), (2, short), (1, long_)]) for kind in "LS"}
    for probes in measured.values():
        assert all(peak > kept > 0 for peak, kept in probes.values()) and probes[(1, long_)] > probes[(1, short)]
    model = memory_plan.fit(measured)
    predicted = model.activations(4, 65536)
    (actual, _), = memory_plan.probe([], "tiny", config, [*options, "model.n_layers=4"], [(4, 65536)]).values()
    assert abs(predicted - actual) <= 0.1 * actual, (predicted, actual)
    alone = actual
    short, long_ = memory_plan.probe_lengths(cfg, sharing=4)
    shared = memory_plan.fit_shared(model, {split: {kind: memory_plan.probe(
        [], "tiny", config, [*options, f"model.layer_pattern={kind}"], [(1, short), (1, long_)], sharing=split)
        for kind in "LS"} for split in (2, 4)})
    predicted = shared.activations(4, 65536, sharing=4)
    (actual, _), = memory_plan.probe([], "tiny", config, [*options, "model.n_layers=4"], [(4, 65536)],
                                     sharing=4).values()
    assert abs(predicted - actual) <= 0.1 * actual, (predicted, actual)
    assert actual < 0.5 * alone   # sharing the sequence saves memory (less than a quarter: fixed costs stay)


def test_plan_names_the_option_that_fits_each_card(monkeypatch):
    """With probes that follow a known model: kept 10 KB and working 100 KB a position and layer,
    mini-sequence 60 KB of working set."""
    def probe(overrides, preset, config, option, shapes, sharing=1):
        working = 60e3 if any("ffn_chunk" in o for o in option) else 100e3
        return {(layers, positions): (positions / sharing * (layers * 10e3 + working) + (sharing > 1) * 5e3 * positions,
                                      positions / sharing * layers * 10e3) for layers, positions in shapes}

    monkeypatch.setattr(memory_plan, "probe", probe)
    cfg = load_config(str(DEFAULT_CONFIG), ["data.max_seq_len=65536", "data.batch_size=1"], "base")
    said = []
    needs = memory_plan.plan(cfg, [], "base", str(DEFAULT_CONFIG), [24, 8, 3, 2], said.append, sharing=8)
    weights = memory_plan.parameters_of(cfg) * memory_plan.BYTES_PER_PARAMETER
    gib = memory_plan.GIB
    assert abs(needs["plain"] - (weights + 65536 * (12 * 10e3 + 100e3)) / gib) < 1e-9
    assert abs(needs["mini-sequence + offload"] - (weights + 65536 * (10e3 + 60e3)) / gib) < 1e-9
    lines = "\n".join(said)
    assert "a 24 GiB card: fits with plain" in lines          # 15.1 GiB
    assert "a 8 GiB card: fits with mini-sequence + offload" in lines   # 5.8 GiB
    assert abs(needs["plain, context parallel x8"] - (weights + 8192 * (12 * 10e3 + 100e3) + 65536 * 5e3) / gib) < 1e-9
    assert "a 3 GiB card: fits with mini-sequence + offload, context parallel x8" in lines   # 2.3 GiB
    assert "a 2 GiB card: fits with none of these" in lines
    assert "to train on every card" not in lines   # the 2 GiB card fits none
    said.clear()
    memory_plan.plan(cfg, ["data.max_seq_len=65536"], "base", str(DEFAULT_CONFIG), [3] * 8, said.append, sharing=8)
    assert said[-1] == ("to train on every card: torchrun --standalone --nproc_per_node 8 model_trainer.py "
                        "--flight-host DATA-BOX --port 8815 --preset base --set data.max_seq_len=65536 "
                        "--set model.activation_checkpointing=true --set model.ffn_chunk=1024 "
                        "--set model.offload_checkpoints=true --set train.context_parallel=8 --set train.rank_shares=auto")
    said.clear()
    memory_plan.plan(cfg, [], "base", str(DEFAULT_CONFIG), [24, 8], said.append, sharing=8)
    assert said[-1].endswith("--nproc_per_node 2 model_trainer.py --flight-host DATA-BOX --port 8815 --preset base "
                             "--set model.activation_checkpointing=true --set model.ffn_chunk=1024 "
                             "--set model.offload_checkpoints=true")   # each card a whole sequence


def test_plan_is_a_trainer_command(capsys):
    assert model_trainer.main(["plan", "--preset", "tiny", "--cards", "1"]) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "a 1 GiB card: fits with plain" in out
