"""What fits where: the memory one training process needs for a configuration, from a cost
model calibrated by probe steps on this machine, and the settings that fit each card.

    python model_trainer.py plan --preset base --set data.max_seq_len=262144 [--cards 24,24,8,8,8,8,8,8]

The model: bytes = parameters x 16 (fp32 weights, gradients and AdamW's two moments)
+ positions x (layers x kept per layer + the working set of the costliest layer). Probe steps
(forward and backward of one sequence, in a fresh process per option and kind of layer) at the
configuration's width, with one layer of each kind at two lengths and two at the shorter,
measure the per-position terms for each option: plain, the mini-sequence feed-forward
(model.ffn_chunk), and with the checkpoints kept in host memory (model.offload_checkpoints: the
per-layer term leaves the card). Without --cards the present
GPUs are planned for, measured; with it, the cards are what-ifs in GiB and the probes run on
this machine (a CPU measures fp32: on a card in fp16 the per-position terms about halve).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from config import DEFAULT_CONFIG, Config, load_config

BYTES_PER_PARAMETER = 16          # fp32 weights, gradients, AdamW's exp_avg and exp_avg_sq
FFN_CHUNK = 1024                  # the mini-sequence option's chunk
GIB = 2 ** 30


@dataclass
class MemoryModel:
    """Bytes a process needs beyond the weights' share: per position, what each layer keeps for
    backward, and the working set of the layer being computed, for the costliest kind of layer
    in the pattern (a sparse layer's grows with the length: its compressed branch gives every
    query n / block keys)."""
    kept_per_layer: float                       # bytes per position per layer
    working: dict[str, tuple[float, float]]     # layer kind -> bytes per position: a + b x positions

    def working_at(self, positions: int) -> float:
        return max(a + b * positions for a, b in self.working.values())

    def activations(self, layers: int, positions: int, offloaded: bool = False) -> float:
        kept = self.kept_per_layer * (1 if offloaded else layers)   # offloaded: one block's input comes back at a time
        return positions * (kept + self.working_at(positions))


def fit(measured: dict[str, dict[tuple[int, int], tuple[float, float]]]) -> MemoryModel:
    """{layer kind: {(layers, positions): (peak bytes, bytes kept for backward)}} of probes with
    one layer at two lengths and two layers at the first -> the model's terms. What a layer
    keeps is the difference the second layer makes to what is kept (exact: counted, not a
    peak); a kind's working set per position is the rest of the one-layer peaks, a straight
    line through the two lengths where it rises."""
    kept = []
    working = {}
    for kind, probes in measured.items():
        (short, long_) = sorted(n for layers, n in probes if layers == 1)
        kept.append((probes[(2, short)][1] - probes[(1, short)][1]) / short)
        per_position = {n: probes[(1, n)][0] / n for n in (short, long_)}
        # A share that falls with length (fixed costs spread out) is held at the longer probe's:
        # the plan may overestimate, never promise a fit it does not measure.
        slope = max(0.0, (per_position[long_] - per_position[short]) / (long_ - short))
        working[kind] = (per_position[long_] - slope * long_, slope)
    kept_per_layer = max(kept)
    return MemoryModel(kept_per_layer, {kind: (a - kept_per_layer, b) for kind, (a, b) in working.items()})


def probe(overrides: list[str], preset: str | None, config_path: str, option: list[str],
          shapes: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """{(layers, positions): (peak bytes above the weights and inputs of a forward+backward of
    one sequence, bytes autograd kept for backward)}, measured in a fresh process (torch's peak
    allocation on a GPU, the profiler's timeline of tensor memory on a CPU), gradients left out
    (counted per parameter)."""
    spec = {"overrides": [*overrides, *option], "preset": preset, "config": config_path, "shapes": shapes}
    command = [sys.executable, str(Path(__file__).resolve().parent / "memory_plan.py"), "--probe", json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return {tuple(shape): tuple(values) for shape, values in json.loads(proc.stdout.strip().splitlines()[-1])}


def _probe_main(spec: dict) -> list:
    import torch

    from custom_transformer import CustomTransformer
    from packing import SequenceLayout
    from parallel import choose_device
    from planning import probe_inputs
    measured = []
    for layers, positions in spec["shapes"]:
        cfg = load_config(spec["config"], [*spec["overrides"], f"model.n_layers={layers}",
                                           f"data.max_seq_len={positions}"], spec["preset"])
        device, amp_dtype = choose_device(cfg.train.device, cfg.train.precision)
        torch.manual_seed(0)
        model = CustomTransformer(cfg.model).to(device)
        batch, masks = probe_inputs(SequenceLayout(positions, cfg.model.frames_per_position), cfg.model, 1)
        batch, masks = batch.to(device), masks.to(device)

        kept: dict[int, int] = {}   # storage -> bytes of what autograd keeps for backward

        def keep(tensor):
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        def step():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
                    loss, _ = model(batch, masks)
            loss.backward()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            used = torch.cuda.max_memory_allocated(device) - before
        else:   # the profiler's timeline of tensor memory: exact, where a process's RSS depends on its allocator
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                        record_shapes=True, with_stack=True) as profiler:
                step()
            with tempfile.TemporaryDirectory() as folder:
                profiler.export_memory_timeline(f"{folder}/timeline.raw.json", device="cpu")
                _, sizes = json.loads(Path(f"{folder}/timeline.raw.json").read_text())
            used = max(sum(size) for size in sizes) - sum(sizes[0])
        gradients = sum(p.numel() * p.element_size() for p in model.parameters())
        measured.append([[layers, positions], [used - gradients, sum(kept.values())]])
    return measured


OPTIONS = {   # name -> the settings it adds
    "plain": [],
    "mini-sequence": [f"model.ffn_chunk={FFN_CHUNK}"],
    "mini-sequence + offload": [f"model.ffn_chunk={FFN_CHUNK}", "model.offload_checkpoints=true"],
}


def probe_lengths(cfg: Config) -> tuple[int, int]:
    """Two lengths past the shapes' thresholds (a sparse layer selects every block of a sequence
    shorter than top-k blocks; a window reaches past a short one), where each kind of layer's
    memory per position has settled into its trend."""
    short = max(2048, 2 * cfg.model.sparse_topk * cfg.model.sparse_block, 4 * cfg.model.window)
    return short, 2 * short


def parameters_of(cfg: Config) -> int:
    import torch

    from custom_transformer import CustomTransformer
    with torch.device("meta"):
        return sum(p.numel() for p in CustomTransformer(cfg.model).parameters())


def plan(cfg: Config, overrides: list[str], preset: str | None, config_path: str, cards_gib: list[float],
         say=print) -> dict[str, float]:
    """-> GiB per process for each option at the configuration's length; says which fit which cards."""
    positions, layers = cfg.data.max_seq_len, cfg.model.n_layers
    checkpointing = ["model.activation_checkpointing=true"]
    weights = parameters_of(cfg) * BYTES_PER_PARAMETER
    needs, models = {}, {}
    short, long_ = probe_lengths(cfg)
    for name, option in OPTIONS.items():
        measured_option = tuple(checkpointing + [o for o in option if "offload" not in o])   # a CPU moves nothing
        if measured_option not in models:
            models[measured_option] = fit({kind: probe(overrides, preset, config_path,
                                                       [*measured_option, f"model.layer_pattern={kind}"],
                                                       [(1, short), (2, short), (1, long_)])
                                           for kind in sorted(set(cfg.model.layer_pattern))})
        model = models[measured_option]
        needs[name] = (weights + cfg.data.batch_size * model.activations(layers, positions, "offload" in name)) / GIB
        say(f"{name:<26} {needs[name]:>8.1f} GiB   (kept {model.kept_per_layer / 1e3:.1f} KB a position and layer, "
            f"working set {model.working_at(positions) / 1e3:.1f} KB a position)")
    for card in sorted(set(cards_gib), reverse=True):
        fitting = [name for name, gib in needs.items() if gib <= card * 0.9]   # a tenth left for the allocator
        say(f"a {card:g} GiB card: " + (f"fits with {fitting[0]}" if fitting else
                                        "fits with none of these: a shorter data.max_seq_len, or several cards "
                                        "sharing each sequence (train.context_parallel; its sparse layers are "
                                        "still computed whole on every card, so they do not shrink)"))
    return needs


def describe_probe_device(cfg: Config) -> str:
    from parallel import choose_device, dtype_name
    device, amp_dtype = choose_device(cfg.train.device, cfg.train.precision)
    where = f"{device.type}, {dtype_name(amp_dtype)}"
    return where + ("; on a card in fp16 the per-position terms about halve" if device.type == "cpu" else "")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--probe"]:
        print(json.dumps(_probe_main(json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="model_trainer.py plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--preset")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--cards", help="card memory in GiB, comma-separated (default: the GPUs present)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set, args.preset)
    if args.cards:
        cards = [float(c) for c in args.cards.split(",")]
    else:
        import torch
        cards = [torch.cuda.get_device_properties(i).total_memory / GIB for i in range(torch.cuda.device_count())]
        if not cards:
            print("no GPU here: the memory per process below; give --cards 24,8 (GiB) to ask what fits them")
    print(f"plan for {cfg.data.max_seq_len:,} positions, batch {cfg.data.batch_size}, {cfg.model.n_layers} layers of "
          f"width {cfg.model.d_model}: memory per process (probe steps of 1-2 layers of each kind at "
          f"{' and '.join(map(str, probe_lengths(cfg)))} positions on this machine, {describe_probe_device(cfg)})")
    plan(cfg, args.set, args.preset, args.config, cards)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
