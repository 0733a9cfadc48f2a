"""Where the time of one training step goes: torch.profiler over steps of a preset on this
machine, fed from the demo corpus over loopback Flight as the trainer is.

    python bench/profile_step.py [--preset small] [--steps 5]

Three tables: the step by phase (waiting for data, forward, backward, optimizer), the forward
pass by module (MLA attention, SwiGLU MLP, norms, and the rest: embeddings, layout, heads,
losses), and the step's operators by category (self time), beside the share of FLOPs each
category does. A category far above its FLOPs share is what to fix. The profiler's own
overhead inflates small operators; compare shares, not absolute times.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from common import ROOT, flop_counter, header, save

import config  # noqa: E402 (path set by common)
import datasets  # noqa: E402 (path set by common)
import demo_corpus  # noqa: E402
import flight_client  # noqa: E402 (path set by common)
import model_trainer  # noqa: E402
import packing  # noqa: E402 (path set by common)
import schema  # noqa: E402 (path set by common)
import step_feed  # noqa: E402
from custom_transformer import CustomTransformer, sample_masks  # noqa: E402
from flight_server import SampleFlightServer  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer")
MODULE_SCOPES = {"attn": "attention (MLA)", "ffn": "MLP (SwiGLU)", "attn_norm": "norms", "ffn_norm": "norms"}


def category(op: str) -> str:
    name = op.lower()
    if "scaled_dot_product" in name or "scaleddotproduct" in name:
        return "attention kernel (SDPA)"
    if any(k in name for k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                               "mmbackward", "addmmbackward", "bmmbackward")):
        return "matrix products"
    if "adamw" in name or "optimizer" in name or "_foreach" in name:
        return "optimizer"
    if any(k in name for k in ("index", "scatter", "gather", "masked", "nonzero", "where", "cat", "stack",
                               "repeat_interleave", "unfold", "pad", "copy", "clone", "contiguous", "to_copy")):
        return "indexing / copies"
    return "elementwise / other"


def scoped(model: CustomTransformer) -> None:
    """Each block's attention, MLP and norms run inside a named profiler range."""
    for block in model.blocks:
        for attr, label in MODULE_SCOPES.items():
            module = getattr(block, attr)
            module.register_forward_pre_hook(lambda m, args, label=label: m.__dict__.setdefault(
                "_ranges", []).append(record_function(label).__enter__()))
            module.register_forward_hook(lambda m, args, out: m._ranges.pop().__exit__(None, None, None))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    cfg = config.load_config(str(ROOT / "config.yaml"), args.set, args.preset)
    demo_corpus.build(ROOT / "data" / "demo")
    layout = packing.SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
    with SampleFlightServer(ROOT / "data" / "demo" / "parquet", "127.0.0.1", 0) as server:
        dataset = datasets.ArrowFlightDataset(flight_client.Connection(("127.0.0.1",), server.port), None, layout, cfg.data.batch_size)
        torch.manual_seed(0)
        model = CustomTransformer(cfg.model)
        model.set_corpus_stats(schema.corpus_info(dataset.metadata()))
        optimizer, _ = model_trainer.make_optimizer(model, cfg.train, torch.device("cpu"))
        stream = step_feed.Prefetch(step_feed.batches(dataset, 0), cfg.data.prefetch)
        generator = torch.Generator()

        def step(index: int):
            with record_function("data"):
                batch = next(stream)
            masks = sample_masks(batch, cfg.model, generator.manual_seed(index))
            optimizer.zero_grad(set_to_none=True)
            with record_function("forward"):
                loss, _ = model(batch, masks)
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                optimizer.step()
            return batch, masks

        for index in range(2):   # warm-up
            step(index)
        batch, masks = step(2)
        with flop_counter() as counter:   # FLOPs shares on one batch
            model(batch, masks)[0].backward()
        flops = collections.Counter()
        for op, count in counter.get_flop_counts()["Global"].items():
            flops[category(str(op).replace(".", "::"))] += count   # aten.mm -> aten::mm, as the profiler names it
        scoped(model)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for index in range(args.steps):
                step(3 + index)
        wall = time.perf_counter() - start
        stream.close()

    events = prof.events()
    phase_time = collections.Counter()
    module_time = collections.Counter()
    for event in events:
        if event.name in PHASES:
            phase_time[event.name] += event.cpu_time_total
        elif event.name in MODULE_SCOPES.values():
            module_time[event.name] += event.cpu_time_total
    op_time = collections.Counter()
    for average in prof.key_averages():
        if average.key in PHASES or average.key in MODULE_SCOPES.values() or average.key.startswith("ProfilerStep"):
            continue
        op_time[category(average.key)] += average.self_cpu_time_total
    step_total = sum(phase_time.values())
    forward_total = phase_time["forward"]
    module_time["rest of forward (embeddings, layout, heads, losses)"] = forward_total - sum(module_time.values())
    op_total = sum(op_time.values())
    flop_total = sum(flops.values())

    lines = [*header(),
             f"# {args.steps} steps of {cfg.data.batch_size} x {cfg.data.max_seq_len} positions under the profiler: "
             f"{wall / args.steps * 1000:.0f} ms per step", "",
             f"{'phase':<52} {'ms/step':>9} {'share':>7}"]
    for name in PHASES:
        lines.append(f"{name:<52} {phase_time[name] / 1e3 / args.steps:>9.1f} {phase_time[name] / step_total:>7.1%}")
    lines += ["", f"{'forward, by module':<52} {'ms/step':>9} {'share':>7}"]
    for name, value in module_time.most_common():
        lines.append(f"{name:<52} {value / 1e3 / args.steps:>9.1f} {value / forward_total:>7.1%}")
    lines += ["", f"{'operators by category (self time)':<52} {'ms/step':>9} {'share':>7} {'FLOPs':>7}"]
    for name, value in op_time.most_common():
        lines.append(f"{name:<52} {value / 1e3 / args.steps:>9.1f} {value / op_total:>7.1%} "
                     f"{flops.get(name, 0) / flop_total:>7.1%}")
    lines += ["", "top operators (self time)"]
    for average in sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:12]:
        if average.key in PHASES or average.key in MODULE_SCOPES.values():
            continue
        lines.append(f"  {average.key[:60]:<60} {average.self_cpu_time_total / 1e3 / args.steps:>8.1f} ms/step "
                     f"x{average.count // args.steps}")
    worst = max(op_time, key=lambda name: op_time[name] / op_total - flops.get(name, 0) / flop_total)
    headline = (f"most time beyond its FLOPs share: {worst} ({op_time[worst] / op_total:.0%} of time, "
                f"{flops.get(worst, 0) / flop_total:.0%} of FLOPs)")
    lines.append(headline)
    print("\n".join(lines))
    save(f"profile_{args.preset}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
