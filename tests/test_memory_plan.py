"""The memory plan: its cost model recovers known terms, predicts a probe it was not fitted on
within 10%, and says which option fits which card."""
import memory_plan
import model_trainer
from config import DEFAULT_CONFIG, load_config

def test_fit_recovers_the_per_position_terms():
    """A window layer's working set constant per position, a sparse layer's growing with length."""
    kept = 3000.0
    working = {"L": (50000.0, 0.0), "S": (20000.0, 4.0)}
    measured = {kind: {(layers, n): (n * (layers * kept + a + b * n), n * (layers * kept + 700.0))
                       for layers, n in ((1, 2048), (2, 2048), (1, 4096))}
                for kind, (a, b) in working.items()}
    model = memory_plan.fit(measured)
    assert abs(model.kept_per_layer - kept) < 1e-6
    for kind, (a, b) in working.items():
        assert abs(model.working[kind][0] - a) < 1e-6 and abs(model.working[kind][1] - b) < 1e-9
    assert abs(model.working_at(1000) - 50000.0) < 1e-6 and abs(model.working_at(10000) - 60000.0) < 1e-6
    assert abs(model.activations(12, 1000) - 1000 * (12 * kept + 50000.0)) < 1e-3
    assert abs(model.activations(12, 1000, offloaded=True) - 1000 * (kept + 50000.0)) < 1e-3


def test_the_fitted_model_predicts_a_longer_deeper_probe_within_a_tenth():
    """Fitted on one and two layers of each kind at the plan's probe lengths (2,048 and 4,096
    for `tiny`), checked on its pattern's four layers (L, S, L, S) at 16,384 positions, measured."""
    config = str(DEFAULT_CONFIG)
    options = ["model.activation_checkpointing=true"]
    short, long_ = memory_plan.probe_lengths(load_config(config, [], "tiny"))
    measured = {kind: memory_plan.probe([], "tiny", config, [*options, f"model.layer_pattern={kind}"],
                                        [(1, short), (2, short), (1, long_)]) for kind in "LS"}
    for probes in measured.values():
        assert all(peak > kept > 0 for peak, kept in probes.values()) and probes[(1, long_)] > probes[(1, short)]
    predicted = memory_plan.fit(measured).activations(4, 16384)
    (actual, _), = memory_plan.probe([], "tiny", config, [*options, "model.n_layers=4"], [(4, 16384)]).values()
    assert abs(predicted - actual) <= 0.1 * actual, (predicted, actual)


def test_plan_names_the_option_that_fits_each_card(monkeypatch):
    """With probes that follow a known model: kept 10 KB and working 100 KB a position and layer,
    mini-sequence 60 KB of working set."""
    def probe(overrides, preset, config, option, shapes):
        working = 60e3 if any("ffn_chunk" in o for o in option) else 100e3
        return {(layers, positions): (positions * (layers * 10e3 + working), positions * layers * 10e3)
                for layers, positions in shapes}

    monkeypatch.setattr(memory_plan, "probe", probe)
    cfg = load_config(str(DEFAULT_CONFIG), ["data.max_seq_len=65536", "data.batch_size=1"], "base")
    said = []
    needs = memory_plan.plan(cfg, [], "base", str(DEFAULT_CONFIG), [24, 8, 2], said.append)
    weights = memory_plan.parameters_of(cfg) * memory_plan.BYTES_PER_PARAMETER
    gib = memory_plan.GIB
    assert abs(needs["plain"] - (weights + 65536 * (12 * 10e3 + 100e3)) / gib) < 1e-9
    assert abs(needs["mini-sequence + offload"] - (weights + 65536 * (10e3 + 60e3)) / gib) < 1e-9
    lines = "\n".join(said)
    assert "a 24 GiB card: fits with plain" in lines          # 15.1 GiB
    assert "a 8 GiB card: fits with mini-sequence + offload" in lines   # 5.8 GiB
    assert "a 2 GiB card: fits with none of these" in lines


def test_plan_is_a_trainer_command(capsys):
    assert model_trainer.main(["plan", "--preset", "tiny", "--cards", "1"]) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "a 1 GiB card: fits with plain" in out
