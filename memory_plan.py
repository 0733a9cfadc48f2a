"""What fits where: the memory one training process needs for a configuration, from a cost
model calibrated by probe steps on this machine, and the settings that fit each card.

    python model_trainer.py plan --preset base --set data.max_seq_len=262144 [--cards 24,24,8,8,8,8,8,8]

The model: bytes = parameters x 16 (fp32 weights, gradients and AdamW's two moments)
+ positions x (layers x kept per layer + the working set of the costliest layer). Probe steps
(forward and backward of one sequence, in a fresh process per option and kind of layer) at the
configuration's width, with one layer of each kind at two lengths and two at the shorter,
measure the per-position terms for each option: plain, the mini-sequence feed-forward
(model.ffn_chunk), and with the checkpoints kept in host memory (model.offload_checkpoints: the
per-layer term leaves the card). With context parallelism (N processes sharing each sequence,
train.context_parallel) a process keeps its slice's checkpoints, positions / N, and its working
set is its slice's share (in 1/N) and what every process holds whole (what a global or sparse
layer gathers from every slice, the heads' output), fitted on probes of one layer of each kind
split over 2 and over 4 processes at two lengths (so that planning for 8 does not need 8 probe
processes of a long sequence on one machine). Without --cards the present GPUs are planned
for, measured; with it, the cards are what-ifs in GiB and the probes run on this machine (a
CPU measures fp32: on a card in fp16 the per-position terms about halve).
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from config import DEFAULT_CONFIG, Config, load_config

BYTES_PER_PARAMETER = 16          # fp32 weights, gradients, AdamW's exp_avg and exp_avg_sq
FFN_CHUNK = 1024                  # the mini-sequence option's chunk
GIB = 2 ** 30


SPLITS = (2, 4)   # processes sharing a sequence in the split probes (a plan for more extrapolates in 1/N)


@dataclass
class MemoryModel:
    """Bytes a process needs beyond the weights' share: per position, what each layer keeps for
    backward, and the working set of the layer being computed, for the costliest kind of layer
    in the pattern."""
    kept_per_layer: float                       # bytes per position (of the process's slice) per layer
    working: dict[str, tuple[float, float]]     # layer kind -> its working set, a x positions + c bytes
    # Context parallelism: layer kind -> a process's working set when N processes share each
    # sequence of n positions, (a, r, c, d): a x n / N (its slice's share) + r x n (what a global
    # or sparse layer gathers of the whole rows, the heads' whole output) + c / N + d bytes
    shared: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)

    def working_bytes(self, positions: int, sharing: int = 1) -> float:
        """The costliest layer's working set on a process holding 1/sharing of each row."""
        if sharing == 1:
            return max(max(0.0, a * positions + c) for a, c in self.working.values())
        if not self.shared:
            raise ValueError("the model was fitted without probes split over several processes")
        return max(max(0.0, (a / sharing + r) * positions + c / sharing + d) for a, r, c, d in self.shared.values())

    def activations(self, layers: int, positions: int, offloaded: bool = False, sharing: int = 1) -> float:
        kept = self.kept_per_layer * (1 if offloaded else layers)   # offloaded: one block's input comes back at a time
        return -(-positions // sharing) * kept + self.working_bytes(positions, sharing)


def _line(probes: dict[tuple[int, int], tuple[float, float]]) -> tuple[float, float]:
    """A straight line through the one-layer peaks at two lengths: (bytes a position, fixed bytes)."""
    (short, long_) = sorted(n for layers, n in probes if layers == 1)
    slope = (probes[(1, long_)][0] - probes[(1, short)][0]) / (long_ - short)
    return slope, probes[(1, short)][0] - slope * short


def fit(measured: dict[str, dict[tuple[int, int], tuple[float, float]]]) -> MemoryModel:
    """{layer kind: {(layers, positions): (peak bytes, bytes kept for backward)}} of probes with
    one layer at two lengths and two layers at the first -> the model's terms. What a layer
    keeps is the difference the second layer makes to what is kept (exact: counted, not a
    peak); a kind's working set is the rest of the one-layer peaks, a straight line through the
    two lengths. (Every branch's working set is linear in the length: long documents are
    processed in chunks of bounded size. Measured per position it rises towards the line's
    slope from below where fixed costs are negative, and falls towards it from above where
    they are positive: extrapolated as a share per position, either runs away.)"""
    kept = []
    for probes in measured.values():
        short = min(n for layers, n in probes if layers == 2)
        kept.append((probes[(2, short)][1] - probes[(1, short)][1]) / short)
    kept_per_layer = max(kept)
    return MemoryModel(kept_per_layer, {kind: (a - kept_per_layer, c) for kind, (a, c) in
                                        ((kind, _line(probes)) for kind, probes in measured.items())})


def fit_shared(model: MemoryModel, measured: dict[int, dict[str, dict[tuple[int, int], tuple[float, float]]]]
               ) -> MemoryModel:
    """The model with context parallelism, from probes of one layer of each kind split over 2 and
    over 4 processes at two lengths ({processes: {kind: {(1, positions): (the largest process's
    peak, kept)}}}): at each split a straight line in the rows' length, whose slope and fixed
    bytes are each a part that divides among the processes and a part every process holds
    whole; less what the slice keeps."""
    (few, lines_few), (many, lines_many) = sorted((n, {kind: _line(probes) for kind, probes in kinds.items()})
                                                  for n, kinds in measured.items())
    shared = {}
    for kind, (a_few, c_few) in lines_few.items():
        a_many, c_many = lines_many[kind]
        divided, whole = _split(a_few, a_many, few, many)
        shared[kind] = (divided - model.kept_per_layer, whole, *_split(c_few, c_many, few, many))
    return MemoryModel(model.kept_per_layer, model.working, shared)


def _split(at_few: float, at_many: float, few: int, many: int) -> tuple[float, float]:
    """A figure measured with `few` and with `many` processes -> (x, y) with figure = x / N + y."""
    divided = (at_few - at_many) / (1 / few - 1 / many)
    return divided, at_many - divided / many


def probe(overrides: list[str], preset: str | None, config_path: str, option: list[str],
          shapes: list[tuple[int, int]], sharing: int = 1) -> dict[tuple[int, int], float]:
    """{(layers, positions): (peak bytes above the weights and inputs of a forward+backward of
    one sequence, bytes autograd kept for backward)}, measured in a fresh process (torch's peak
    allocation on a GPU, the profiler's timeline of tensor memory on a CPU), gradients left out
    (counted per parameter). With `sharing` > 1: that many processes each hold a slice of the
    sequence (context parallelism, gloo; on a CPU unless there are that many GPUs); the largest
    process's figures."""
    spec = {"overrides": [*overrides, *option], "preset": preset, "config": config_path, "shapes": shapes,
            "sharing": sharing}
    command = [sys.executable, str(Path(__file__).resolve().parent / "memory_plan.py"), "--probe", json.dumps(spec)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(sharing)})
             for rank in range(sharing)]
    outputs = [proc.communicate(timeout=3600) for proc in procs]
    for rank, proc in enumerate(procs):   # a process killed stops the others with a connection error: name it first
        if proc.returncode < 0:
            raise RuntimeError(f"memory probe of {shapes} (layers, positions) on {sharing} process(es): process {rank} "
                               f"was killed by signal {-proc.returncode}" + (" (out of host memory?)" if proc.returncode == -9 else ""))
    for proc, (out, err) in zip(procs, outputs):
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe failed: {(err or out).strip().splitlines()[-1:]}")
    per_process = [{tuple(shape): tuple(values) for shape, values in json.loads(out.strip().splitlines()[-1])}
                   for out, _ in outputs]
    return {shape: max(p[shape] for p in per_process) for shape in per_process[0]}


def _probe_main(spec: dict) -> list:
    import torch

    from custom_transformer import CustomTransformer
    from packing import SequenceLayout
    from parallel import choose_device, init_distributed
    from planning import probe_inputs
    measured = []
    sharing = spec["sharing"]
    if sharing > 1 and torch.cuda.device_count() < sharing:
        spec["overrides"].append("train.device=cpu")
    slices = None
    for layers, positions in spec["shapes"]:
        cfg = load_config(spec["config"], [*spec["overrides"], f"model.n_layers={layers}",
                                           f"data.max_seq_len={positions}"], spec["preset"])
        if sharing > 1 and slices is None:
            slices = init_distributed(cfg.train.device, sharing).context
        device, amp_dtype = choose_device(cfg.train.device, cfg.train.precision, int(os.environ["LOCAL_RANK"]))
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
                    loss, _ = model(batch, masks, slices=slices)
            loss.backward()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            used = torch.cuda.max_memory_allocated(device) - before
        else:   # the profiler's record of every allocation and free: exact, where a process's RSS depends on its allocator
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
                step()
            used = max(itertools.accumulate(size for _, size in sorted(_allocations(
                profiler.profiler.kineto_results.experimental_event_tree()))))
        gradients = sum(p.numel() * p.element_size() for p in model.parameters())
        measured.append([[layers, positions], [used - gradients, sum(kept.values())]])
    return measured


def _allocations(events):
    """(time, bytes allocated (+) or freed (-)) of every allocation event in a profiler's event tree."""
    from torch._C._profiler import _EventType
    for event in events:
        if event.tag == _EventType.Allocation:
            yield event.start_time_ns, event.extra_fields.alloc_size
        yield from _allocations(event.children)


OPTIONS = {   # name -> the settings it adds
    "plain": [],
    "mini-sequence": [f"model.ffn_chunk={FFN_CHUNK}"],
    "mini-sequence + offload": [f"model.ffn_chunk={FFN_CHUNK}", "model.offload_checkpoints=true"],
}


def probe_lengths(cfg: Config, sharing: int = 1) -> tuple[int, int]:
    """Two lengths past the shapes' thresholds (a sparse layer selects every block of a sequence
    shorter than top-k blocks; a window reaches past a short one) and past the sparse layer's
    chunk sizes, where each kind of layer's memory has settled into a straight line (at `base`
    width a sparse layer's share per position measured 254, 176, 157 and 156 KB at 2k, 4k, 8k
    and 16k positions: its block ranking fills its chunks at 9.5k). Split over `sharing`
    processes, each slice twice past them (a sparse layer's slice of 2,048 positions still has
    a fixed chunk term the longer ones lose: `tiny` over 4, fitted on slices of 768, 2,048 and
    4,096 positions, predicted 0.75x, 0.93x and 0.98-1.00x of four layers at 65,536)."""
    from attention import chunked_from
    m = cfg.model
    shapes = max(2048, 2 * m.sparse_topk * m.sparse_block, 4 * m.window)
    short = max(shapes, 2 * sharing * shapes if sharing > 1 else 0)
    if "S" in m.layer_pattern:
        short = max(short, chunked_from(m.n_heads, m.sparse_block, m.sparse_topk, m.qk_nope_head_dim + m.qk_rope_head_dim,
                                          m.sparse_chunk))
    short = -(-short // 1024) * 1024
    return short, 2 * short


def parameters_of(cfg: Config) -> int:
    import torch

    from custom_transformer import CustomTransformer
    with torch.device("meta"):
        return sum(p.numel() for p in CustomTransformer(cfg.model).parameters())


def fitted_model(overrides: list[str], preset: str | None, config_path: str, cfg: Config, option: list[str],
                 sharing: int = 1) -> MemoryModel:
    """The cost model for `option`, fitted on probes of each kind of layer in the pattern at the
    plan's two lengths (and with `sharing` > 1, split over 2 and over 4 processes)."""
    short, long_ = probe_lengths(cfg)
    kinds = sorted(set(cfg.model.layer_pattern))
    model = fit({kind: probe(overrides, preset, config_path, [*option, f"model.layer_pattern={kind}"],
                             [(1, short), (2, short), (1, long_)]) for kind in kinds})
    if sharing == 1:
        return model
    short, long_ = probe_lengths(cfg, max(SPLITS))
    return fit_shared(model, {split: {kind: probe(overrides, preset, config_path, [*option, f"model.layer_pattern={kind}"],
                                                  [(1, short), (1, long_)], sharing=split) for kind in kinds}
                              for split in SPLITS})


def plan(cfg: Config, overrides: list[str], preset: str | None, config_path: str, cards_gib: list[float],
         say=print, sharing: int = 1) -> dict[str, float]:
    """-> GiB per process for each option at the configuration's length (with `sharing` > 1 also
    each option with that many processes sharing every sequence: train.context_parallel); says
    which fit which cards."""
    positions, layers = cfg.data.max_seq_len, cfg.model.n_layers
    checkpointing = ["model.activation_checkpointing=true"]
    weights = parameters_of(cfg) * BYTES_PER_PARAMETER
    needs, fitted, models = {}, {}, {}
    for name, option in OPTIONS.items():
        measured_option = tuple(checkpointing + [o for o in option if "offload" not in o])   # a CPU moves nothing
        if measured_option not in fitted:
            fitted[measured_option] = fitted_model(overrides, preset, config_path, cfg, list(measured_option), sharing)
        models[name] = fitted[measured_option]
    for split in sorted({1, sharing}):   # one card per sequence preferred: in that order
        for name in OPTIONS:
            model, label = models[name], name if split == 1 else f"{name}, context parallel x{split}"
            needs[label] = (weights + cfg.data.batch_size * model.activations(layers, positions, "offload" in name,
                                                                               split)) / GIB
            say(f"{label:<46} {needs[label]:>7.1f} GiB   (kept {model.kept_per_layer / 1e3:.1f} KB a position and "
                f"layer, working set {model.working_bytes(positions, split) / GIB:.2f} GiB)")
    for card in sorted(set(cards_gib), reverse=True):
        fitting = [name for name, gib in needs.items() if gib <= card * 0.9]   # a tenth left for the allocator
        say(f"a {card:g} GiB card: " + (f"fits with {fitting[0]}" if fitting else
                                        "fits with none of these: a shorter data.max_seq_len, or more cards "
                                        "sharing each sequence (--context-parallel N)"))
    everywhere = [label for label, gib in needs.items() if cards_gib and gib <= min(cards_gib) * 0.9]
    if everywhere:
        say("to train on every card: " + command(everywhere[0], len(cards_gib), sharing, overrides, preset,
                                                 config_path))
    return needs


def command(label: str, cards: int, sharing: int, overrides: list[str], preset: str | None, config_path: str) -> str:
    """The training command for a plan's option (`label`) over `cards` processes."""
    name, _, split = label.partition(", context parallel")
    settings = [*overrides, "model.activation_checkpointing=true", *OPTIONS[name]]
    if split:
        settings += [f"train.context_parallel={sharing}", "train.rank_shares=auto"]
    settings = list(dict.fromkeys(settings))
    launch = f"torchrun --standalone --nproc_per_node {cards} model_trainer.py" if cards > 1 else "python model_trainer.py"
    return " ".join([launch, "--flight-host DATA-BOX --port 8815",
                     *([f"--config {config_path}"] if Path(config_path).resolve() != DEFAULT_CONFIG.resolve() else []),
                     *([f"--preset {preset}"] if preset else []), *(f"--set {setting}" for setting in settings)])


def describe_probe_device(cfg: Config) -> str:
    import torch

    from parallel import choose_device, dtype_name
    device, amp_dtype = choose_device(cfg.train.device, cfg.train.precision)
    where = f"{device.type}, {dtype_name(amp_dtype)}"
    half = "; on a card in fp16 the per-position terms about halve: --set train.precision=bf16 measures half precision here"
    return where + (half if device.type == "cpu" and amp_dtype == torch.float32 else "")


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
    parser.add_argument("--context-parallel", type=int, metavar="N",
                        help="plan also for N processes sharing each sequence (default: the number of cards)")
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
    plan(cfg, args.set, args.preset, args.config, cards, sharing=args.context_parallel or max(1, len(cards)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
