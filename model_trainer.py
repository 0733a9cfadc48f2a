"""Train the CustomTransformer on samples streamed from an Arrow Flight server.

    python model_trainer.py --flight-host H --port 8815 --files a.parquet b.parquet
    python model_trainer.py --flight-host A:8815 B:8815          # several data machines
    python model_trainer.py                      # embedded default: demo corpus, in-process server
    python model_trainer.py watch ws://127.0.0.1:8765   # one line per live update
    python model_trainer.py plan --preset base --set data.max_seq_len=262144 --cards 24,8   # what fits where
    python model_trainer.py predict|embed|enroll|evaluate|export --checkpoint C ...   # use a trained model

Without --flight-host the trainer builds the demo corpus if it is missing, starts the Flight
server in this process on 127.0.0.1 and reads through it: the same client/server path as two
machines. Metrics stream live on ws://127.0.0.1:8765, with a dashboard at http://127.0.0.1:8765/.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import random
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import datasets
import demo_corpus
import flight_client
import inference
import live_metrics
import memory_plan
import packing
import schema
from checkpoint import Checkpointer, GlobalRNG
from config import DEFAULT_CONFIG, Config, TrainConfig, architecture_changes, load_config
from context_parallel import SequenceSlices
from custom_transformer import LOSS_TERMS, CustomTransformer, loss_counts
from evaluation import evaluate
from flight_client import Connection
from flight_server import SampleFlightServer
from parallel import (_HELD_UNTIL_EXIT, Ranks, all_ranks, autocast, barrier, choose_device, clock, describe_device,
                      distribute, dtype_name, from_rank0, gradient_sync, init_distributed, peak_flops, set_cpu_threads, unwrapped)
from planning import (compute_seconds, context_shares, faster_precision, fixed_backward, needs_precision_probe,
                      plan_work)
from step_feed import Interrupted, Step, StepFeed, StepResult
from training_run import Enrolled, Meter, Run, TrainingHalted, describe_run, finish_label_heads, open_run

DEMO_DIR = Path("data/demo")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW; matrices and embeddings decay, norms and biases do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type == "cuda")

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning rate at `step` as a share of train.lr: linear warmup, cosine decay to a floor."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_change(saved_train: dict, cfg: TrainConfig, step: int) -> str | None:
    """How resuming with other steps or rates changes the learning rate at `step`, in words."""
    keys = ("steps", "lr", "warmup_steps", "min_lr_ratio")
    if not saved_train or all(saved_train.get(key, getattr(cfg, key)) == getattr(cfg, key) for key in keys):
        return None
    before = dataclasses.replace(cfg, **{key: saved_train[key] for key in keys if key in saved_train})
    old, new = before.lr * lr_factor(step, before), cfg.lr * lr_factor(step, cfg)
    return (f"the checkpoint's run planned {before.steps} steps at lr {before.lr:g}; this one {cfg.steps} at lr "
            f"{cfg.lr:g}: the schedule is recomputed, so the learning rate at step {step} goes from {old:.3g} to "
            f"{new:.3g}" + (" (keep train.steps to finish the old schedule)" if before.steps != cfg.steps else ""))




# ---------------------------------------------------------------------------------------------
# Data source

def open_data(args, cfg: Config, cleanup: contextlib.ExitStack, ranks: Ranks = Ranks()):
    """-> (training dataset, evaluation dataset or None), from the remote Flight server or one
    started in this process (shut down by `cleanup`; under torchrun, one per rank). Evaluation
    files never train."""
    layout = packing.SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
    if args.flight_host:
        connection = Connection.from_args(args)
    else:
        root = args.data_dir
        if root is None:
            if ranks.main:
                demo_corpus.build(DEMO_DIR)
            barrier()
            root = DEMO_DIR / "parquet"
        server = cleanup.enter_context(SampleFlightServer(root, "127.0.0.1", 0))
        connection = Connection(("127.0.0.1",), server.port)

    def dataset(files, shuffle):
        opened = datasets.ArrowFlightDataset.configured(connection, files, layout, cfg.data, shuffle=shuffle)
        if ranks.context:   # a context-parallel group's processes read alike
            opened.read_as(ranks.data_rank, ranks.data_world)
        return opened

    train_set = dataset(args.files, cfg.data.shuffle)
    if not args.eval_files:
        return train_set, None
    overlap = sorted(set(train_set.files) & set(args.eval_files))
    if args.files and overlap:
        raise ValueError(f"files both in --files and --eval-files: {', '.join(overlap)}")
    if overlap:   # every served file was listed: hold the evaluation files out
        train_set = dataset([f for f in train_set.files if f not in overlap], cfg.data.shuffle)
    return train_set, dataset(args.eval_files, False)


# ---------------------------------------------------------------------------------------------
# Training

def train_step(model, micro_batches, optimizer, scheduler, scaler, device, amp_dtype, grad_clip,
               stop_requested: Callable[[], bool] = lambda: False, abandon: bool = False,
               timed: bool = False, context: SequenceSlices | None = None) -> StepResult:
    """Forward and backward over the accumulated (batch, masks) pairs, one exchange of gradients
    (and of the loss and the stop and abandon flags) between ranks, clip, optimizer step.

    A non-finite loss or gradient on any rank skips the optimizer step everywhere; with fp16 the
    GradScaler also skips steps whose scaled gradients overflowed, as it should. A rank that
    could not get its batches (`abandon`: its data failed, or it was stopped while waiting) joins
    with padding batches, and the step is abandoned everywhere: no update, no scheduler step.
    `stop_requested` is asked at the exchange, so a signal during the step stops after it.
    `timed` measures this rank's compute (for re-balancing; it synchronizes the device). With a
    `context` group its processes hold the same batches, each a slice of every row: counts and
    losses exchanged between ranks are taken once per group."""
    optimizer.zero_grad(set_to_none=True)
    cfg = unwrapped(model).cfg
    # Exact averaging: every loss term is divided by its count over the whole step (all batches of
    # all ranks, a few numbers exchanged before backward), and DDP/FSDP's mean over ranks is undone,
    # so the update is the one a single process would make on the union of the step's batches,
    # however unevenly the ranks share the work.
    denominators = sum((loss_counts(batch, masks, cfg) for batch, masks in micro_batches if not batch.padding),
                       torch.zeros(len(LOSS_TERMS))).to(device)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    sharing = context.world if context else 1
    if world > 1:
        torch.distributed.all_reduce(denominators)
        denominators /= sharing
    loss_sum, samples_batches, positions = torch.zeros((), device=device), 0, 0
    metric_sums: dict[str, torch.Tensor] = {}
    forwards, backwards = [], []
    for index, (batch, masks) in enumerate(micro_batches):
        batch, masks = batch.to(device), masks.to(device)
        with gradient_sync(model, enabled=index == len(micro_batches) - 1):
            started = clock(device) if timed else 0.0
            with autocast(device, amp_dtype):
                loss, metrics = model(batch, masks, denominators, slices=context)
            forward_done = clock(device) if timed else 0.0
            # a padding batch (a rank out of data) steps along with the others, learning nothing
            scaler.scale(loss * (0.0 if batch.padding else float(world // sharing))).backward()
            if timed:
                forwards.append(forward_done - started)
                backwards.append(clock(device) - forward_done)
        if not batch.padding:
            loss_sum = loss_sum + loss.detach().float()
            samples_batches += 1
            positions += batch.n_positions(cfg.frames_per_position)
            for name, value in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value
    flags = [float(samples_batches), float(positions), float(stop_requested()), float(abandon)]
    shared = torch.cat([loss_sum[None], torch.tensor(flags, device=device)])
    if world > 1:
        torch.distributed.all_reduce(shared)
    shared[:3] /= sharing   # a group's processes each counted its batches
    mean_loss, batch_total, position_total, stops, abandons = shared.tolist()   # the union's loss
    count = max(samples_batches, 1)
    metrics = {name: float(value) / count for name, value in metric_sums.items()}
    if abandons > 0:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(mean_loss, metrics, math.nan, scheduler.get_last_lr()[0], False, 0, stops > 0, True)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if isinstance(grad_norm, DTensor):   # FSDP: each rank holds a part of the norm
        grad_norm = grad_norm.full_tensor()
    grad_norm = grad_norm.item()
    applied = math.isfinite(mean_loss) and (scaler.is_enabled() or math.isfinite(grad_norm))
    if applied:
        scaler.step(optimizer)
    scaler.update()
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return StepResult(mean_loss, metrics, grad_norm, lr, applied, int(position_total), stops > 0,
                      compute_s=compute_seconds(forwards, backwards, world) if timed else 0.0)


# ---------------------------------------------------------------------------------------------
# The run: counters, run folder, checkpoints, evaluation, metrics

def build_model(cfg: Config, info: schema.CorpusInfo, device: torch.device) -> CustomTransformer:
    model = CustomTransformer(cfg.model)
    model.set_corpus_stats(info)
    model.to(device)
    if cfg.train.compile:
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 0):
            raise ValueError(f"train.compile needs Triton, which needs compute capability 7.0 or newer; "
                             f"{torch.cuda.get_device_name(device)} is sm_"
                             f"{''.join(map(str, torch.cuda.get_device_capability(device)))}: leave it off")
        model.compile_blocks()
    return model


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class StopSignals:
    """SIGINT/SIGTERM as a request to stop. During setup, with nothing to save yet, a signal ends
    the run at once (Interrupted); once training has begun it is answered at the next safe point:
    after the step in flight, or at once while waiting for data. True once a signal came."""

    def __init__(self):
        self.received: list[int] = []
        self.training = False

    def __bool__(self) -> bool:
        return bool(self.received)

    def _handle(self, number, frame):
        self.received.append(number)
        if not self.training:
            raise Interrupted(f"signal {signal.Signals(number).name} during setup")

    def __enter__(self) -> "StopSignals":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Session:
    """What a run trains with, assembled by `setup`."""
    cfg: Config
    ranks: Ranks
    device: torch.device
    amp_dtype: torch.dtype
    run: Run
    dataset: datasets.ArrowFlightDataset
    labels: schema.Labels
    model: CustomTransformer       # the model itself (under DDP, the replica's module)
    trained: torch.nn.Module       # what trains: the model wrapped for several processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    feed: StepFeed
    rebalancer: object | None


def setup(args, cfg: Config, cleanup: contextlib.ExitStack, stop_requested: StopSignals) -> Session:
    """Processes and device, run folder, data, speakers, model, work per process, optimizer,
    checkpoints (restored when resuming); the run's description on the terminal and the feed."""
    ranks = init_distributed(cfg.train.device, cfg.train.context_parallel)
    seed_everything(cfg.train.seed)
    device, amp_dtype = choose_device(cfg.train.device, cfg.train.precision, ranks.local_rank)
    threads, busy = set_cpu_threads(cfg.train.cpu_threads, device, ranks)
    run, resume_path, saved = open_run(args, cfg.train, ranks, cleanup)   # saved: on rank 0 only
    if busy:
        run.say(f"warning: {busy}")
    changed = from_rank0(architecture_changes(saved.get("config", {}).get("model", {}), cfg.model) if saved else [])
    if changed:
        raise ValueError(f"{resume_path} holds a model of another shape than this run's config: resume with "
                         + " ".join(f"--set {item}" for item in changed) + " (or start afresh in another --out)")
    dataset, eval_set = open_data(args, cfg, cleanup, ranks)
    labels = run_speakers(dataset, eval_set, from_rank0(saved.get("labels") if saved else None),
                          from_rank0(saved is not None), run.say, resume_path)
    info = schema.corpus_info(dataset.metadata())
    model = build_model(cfg, dataclasses.replace(info, n_speakers=len(labels.speakers)), device)
    if needs_precision_probe(device, cfg.train.precision):
        amp_dtype, speeds = faster_precision(model, dataset.layout, cfg.data.batch_size, device)
        run.say(f"{describe_device(device)}: " + ", ".join(f"{dtype_name(d)} {v:,.0f}" for d, v in speeds.items())
                + f" positions/s on a probe step: training in {dtype_name(amp_dtype)}")
    # Uneven work per rank (train.rank_shares): by hand, or measured on every card and kept even
    # by the rebalancer.
    per_step, batch_sizes, rebalancer = plan_work(cfg, ranks, model, device, amp_dtype, run.say)
    if ranks.context:   # each process's slice of its group's sequences: by hand, measured, or equal
        ranks = dataclasses.replace(ranks, context=dataclasses.replace(
            ranks.context, shares=context_shares(cfg, ranks, model, device, amp_dtype, run.say)))
        bounds = ranks.context.over(cfg.data.max_seq_len).bounds
        run.say(f"context parallel: {ranks.sharing} processes share each sequence, slices of "
                + ", ".join(str(b - a) for a, b in zip(bounds, bounds[1:])) + " positions of a full one")
    dataset.set_work(per_step, batch_sizes)
    feed = StepFeed(dataset, cfg, ranks, lambda: bool(stop_requested), run.waiting_for_data)
    trained = distribute(model, cfg.train.parallel, ranks, device, cfg.train.grad_compression,
                         fixed_backward(dataset.layout, cfg.model, device, amp_dtype))
    if ranks.world > 1:
        _HELD_UNTIL_EXIT.append(trained)
    optimizer, scheduler = make_optimizer(trained, cfg.train, device)
    # One loss scale for all: a rank in fp16 (a P40) scales, so every rank scales alike, or the
    # summed gradients would mix scaled and unscaled ones.
    scaler = torch.amp.GradScaler(device.type, enabled=any(all_ranks(amp_dtype == torch.float16)))
    enrolled = Enrolled()
    run.checkpointer = Checkpointer(run.out_dir, cfg.train.keep_checkpoints, ranks, model, optimizer,
                                    pieces={"scheduler": scheduler, "scaler": scaler, "labels": labels,
                                            "enrolment": enrolled},
                                    per_rank={"rng": GlobalRNG(), "data": feed},
                                    progress=run.progress, extra={"config": asdict(cfg)})
    if eval_set is not None:
        # the model itself: with DDP that is the replica's module, which runs without collectives
        run.evaluation = functools.partial(evaluate, model, eval_set, cfg, device, amp_dtype, ranks.sharing)
    run.finish = lambda: enrolled.load_state_dict(
        finish_label_heads(model, dataset, cfg.train.parallel, ranks, device, run.say))
    run.meter = Meter(device, model.flops_per_position(cfg.data.max_seq_len), peak_flops(device, amp_dtype))
    if from_rank0(resume_path is not None):
        run.checkpointer.load(saved)
        run.last_checkpoint = (run.progress.step, resume_path)
        run.say(f"resumed from {resume_path} at step {run.progress.step}")
        change = schedule_change(saved.get("config", {}).get("train", {}) if saved else {}, cfg.train,
                                 run.progress.step)
        if change:
            run.say(f"note: {change}")
    session = Session(cfg, ranks, device, amp_dtype, run, dataset, labels, model, trained, optimizer, scheduler,
                      scaler, feed, rebalancer)
    describe_run(session, eval_set, threads)
    feed.open()
    cleanup.callback(feed.close)   # stop reading before the in-process server goes away
    run.progress_bar = cleanup.enter_context(tqdm(
        total=cfg.train.steps, initial=run.progress.step, desc="train", unit="step", dynamic_ncols=True,
        disable=not ranks.main))
    return session


def run_speakers(dataset, eval_set, saved_labels: dict | None, resumed: bool, say, resume_path) -> schema.Labels:
    """Speakers by name: the run's ids come from the checkpoint (new names appended) or the
    training files; the training and evaluation files are mapped onto them by name."""
    labels = schema.Labels(schema.speaker_names(dataset.metadata()))
    if saved_labels:
        labels = schema.Labels(**saved_labels).extended(labels.speakers)
    elif resumed:
        say(f"{resume_path} holds no speaker map (written before speakers were kept by name): "
            "numbering them from the training files, as that run did")
    for data in filter(None, (dataset, eval_set)):
        data.use_speakers(labels.speakers)
    return labels


def train(args, cfg: Config) -> dict:
    with contextlib.ExitStack() as cleanup:
        # First of all, so that a signal during the slow setup still ends the run cleanly.
        stop_requested = cleanup.enter_context(StopSignals())
        s = setup(args, cfg, cleanup, stop_requested)
        run, feed, start_step = s.run, s.feed, s.run.progress.step
        losses, last_path = [], None
        s.trained.train()
        stop_requested.training = True
        try:
            for step in range(start_step, cfg.train.steps):
                # 1. This rank's batches for the step, each with its masks; padding where data failed.
                started = time.perf_counter()
                this = feed.next_step(step)
                # 2. Forward, backward, one exchange between ranks, optimizer step (or a skip).
                result = train_step(s.trained, this.micro_batches, s.optimizer, s.scheduler, s.scaler, s.device,
                                    s.amp_dtype, cfg.train.grad_clip, lambda: bool(stop_requested),
                                    abandon=this.missing is not None, timed=s.rebalancer is not None,
                                    context=s.ranks.context)
                if result.abandoned:   # not counted, its batches not recorded: a resume reads them again
                    last_path = run.abandon(this.missing, result.stop) or last_path
                    break
                feed.commit(this)
                # 3. Counters, metrics, and a stop after too many non-finite steps in a row.
                losses.append(result.loss)
                done = run.after_step(result, this, time.perf_counter() - started)
                # 4. The label heads finished at the end, evaluation, checkpoints; a requested stop.
                last_path = run.end_of_step(done, result.stop) or last_path
                if result.stop:
                    run.say(f"asked to stop: stopped after step {done}, checkpoint {last_path}")
                    break
                # 5. With train.rank_shares=auto: a plan that evens out the ranks' measured compute
                #    better takes over from the next epoch.
                if s.rebalancer is not None:
                    rebalance(s, this, result, done)
        except Exception as err:
            run.publish({"type": "failed", "step": run.progress.step, "error": f"{type(err).__name__}: {err}"})
            raise
        run.publish({"type": "finished", "step": start_step + len(losses), "steps": cfg.train.steps,
                     "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                     "checkpoint": str(last_path) if last_path else None})
    return {"losses": losses, "checkpoint": last_path, "main": s.ranks.main}


def rebalance(s: Session, this: Step, result: StepResult, done: int) -> None:
    s.rebalancer.add(this.positions(s.cfg.model.frames_per_position), result.compute_s)
    proposal = s.rebalancer.propose(done, s.feed.per_step, s.feed.batch_sizes)
    if proposal is None:
        return
    per_step, batch_sizes, speeds = proposal
    s.feed.replan(per_step, batch_sizes)
    s.run.say(f"step {done}: measured compute {', '.join(f'{v:,.0f}' for v in speeds)} positions/s per process: "
              f"from epoch {s.feed.epoch + 1} on, batches {per_step} of {batch_sizes} sequences")
    s.run.publish({"type": "rebalance", "step": done, "from_epoch": s.feed.epoch + 1,
                   "positions_per_s_by_process": speeds, "batches_per_step_by_process": per_step,
                   "batch_size_by_process": batch_sizes})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flight_client.add_arguments(parser)   # without --flight-host: the embedded in-process server
    parser.add_argument("--files", nargs="+", help="files to train on, as the server names them (default: all)")
    parser.add_argument("--eval-files", nargs="+", help="files to evaluate on (held out of training)")
    parser.add_argument("--data-dir", help="without --flight-host: folder of Parquet files to serve "
                                           f"in-process (default: the demo corpus in {DEMO_DIR}, built if missing)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--preset", help="a named size from the config's presets: tiny, small, base, long")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--steps", type=int, help="shorthand for --set train.steps=N")
    parser.add_argument("--out", default="runs/demo", help="run folder: checkpoints and metrics.jsonl")
    parser.add_argument("--resume", help="'auto' (newest loadable checkpoint in --out) or a checkpoint path")
    parser.add_argument("--ws-host", default="127.0.0.1", help="live metrics bind address")
    parser.add_argument("--ws-port", type=int, default=8765, help="live metrics port (0: any free, -1: off)")
    parser.add_argument("--ws-token-file", help="token that metrics clients must give (required off loopback)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in inference.COMMANDS:   # predict, embed, evaluate, export: a trained model's uses
        return inference.main(argv[0], argv[1:])
    if argv[:1] == ["watch"]:   # python model_trainer.py watch ws://HOST:PORT
        return live_metrics.watch_main(argv[1:], prog="model_trainer.py watch")
    if argv[:1] == ["plan"]:    # what fits where: memory per process, measured on probe steps
        return memory_plan.main(argv[1:])
    args = parse_args(argv)
    try:
        for item in args.set:
            if args.steps and item.replace(" ", "").startswith("train.steps=") and item.split("=", 1)[1].strip() != str(args.steps):
                raise ValueError(f"--steps {args.steps} and --set {item} disagree: give one")
        cfg = load_config(args.config, args.set + ([f"train.steps={args.steps}"] if args.steps else []), args.preset)
    except (ValueError, OSError, yaml.YAMLError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        result = train(args, cfg)
    except Interrupted as err:
        print(f"stopped before training began ({err}): nothing to save", file=sys.stderr)
        return 0
    except (ValueError, OSError, schema.DataError, TrainingHalted) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    losses = result["losses"]
    if losses and result["main"]:
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; "
              f"checkpoint {result['checkpoint']}")
    return 0


def cli() -> None:
    """Run main() as a program. A torchrun process exits at once, its process group intact
    (all collectives are complete by then; see _HELD_UNTIL_EXIT)."""
    try:
        code = main()
    except BaseException:
        if not torch.distributed.is_initialized():
            raise
        traceback.print_exc()   # here, or os._exit below would swallow it
        code = 1
    if torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
