"""Loading the configuration: errors that say where and what was meant."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import config


def test_an_unknown_key_or_section_suggests_the_nearest_known_one():
    with pytest.raises(ValueError, match=r"--set train.step=5: unknown config key train.step \(did you mean "
                                         r"train.steps\?\)"):
        config.load_config(None, ["train.step=5"])
    with pytest.raises(ValueError, match=r"unknown config section trian \(did you mean train\?\)"):
        config.load_config(None, ["trian.steps=5"])
    with pytest.raises(ValueError, match=r"unknown config key model.zzz \(known: model.activation_checkpointing"):
        config.load_config(None, ["model.zzz=1"])


def test_a_typo_in_a_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  d_model: 64\n\ntrain:\n  lr: 0.01\n  step: 10\n")
    with pytest.raises(ValueError, match=rf"{path}:6: unknown config key train.step \(did you mean train.steps\?\)"):
        config.load_config(str(path), [])
    path.write_text("train:\n  steps: 10\npresets:\n  mine:\n    model:\n      windw: 8\n")
    with pytest.raises(ValueError, match=rf"{path}:6: unknown config key model.windw \(did you mean model.window\?\)"):
        config.load_config(str(path), [])   # a preset's typo, even when another preset is chosen
    path.write_text("data:\n  batch_size: many\n")
    with pytest.raises(ValueError, match=rf"{path}:2: data.batch_size: expected int, got 'many'"):
        config.load_config(str(path), [])


def test_numbers_in_exponent_notation_are_floats_in_a_file_and_on_the_command_line(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  lr: 1e-3\n")   # YAML 1.1 reads this as a string
    assert config.load_config(str(path), []).train.lr == 0.001
    assert config.load_config(None, ["train.lr=3e-4"]).train.lr == 0.0003
    with pytest.raises(ValueError, match="--set train.lr=fast: train.lr: expected float, got 'fast'"):
        config.load_config(None, ["train.lr=fast"])
    with pytest.raises(ValueError, match="train.steps: expected int, got '1e3'"):
        config.load_config(None, ["train.steps=1e3"])


def test_the_shipped_config_mirrors_the_dataclasses():
    assert config.load_config(str(config.DEFAULT_CONFIG), []) == config.Config()


def test_the_config_loads_without_torch(tmp_path):
    """A data machine (or any tool) reads the config with torch absent."""
    (tmp_path / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    root = Path(config.__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-c", "import config; print(config.load_config(str(config.DEFAULT_CONFIG), "
                           "[], 'base').model.d_model)"], cwd=root, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "768", proc.stderr
