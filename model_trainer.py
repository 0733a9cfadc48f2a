"""Train the CustomTransformer on samples streamed from an Arrow Flight server.

    python model_trainer.py --flight-host H --port 8815 --files a.parquet b.parquet
    python model_trainer.py                      # embedded default: demo corpus, in-process server
    python model_trainer.py watch ws://127.0.0.1:8765   # one line per live update

Without --flight-host the trainer builds the demo corpus if it is missing, starts the Flight
server in this process on 127.0.0.1 and reads through it: the same client/server path as two
machines. Metrics stream live on ws://127.0.0.1:8765, with a dashboard at http://127.0.0.1:8765/.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import signal
import sys
import time
import traceback
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import datasets
import demo_corpus
import live_metrics
from access import read_token
from checkpoint import Checkpointer, GlobalRNG, find_checkpoint, load_checkpoint
from custom_transformer import CustomTransformer, ModelConfig, sample_masks
from flight_server import SampleFlightServer
from live_metrics import MetricsServer
from parallel import (_HELD_UNTIL_EXIT, Ranks, barrier, choose_device, distribute, from_rank0, gradient_sync,
                      init_distributed, peak_flops, peak_memory_gb, unwrapped)

DEMO_DIR = Path("data/demo")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


# ---------------------------------------------------------------------------------------------
# Configuration: declared once here, mirrored by config.yaml, overridable with --set key=value

@dataclass
class TrainConfig:
    steps: int = 300
    lr: float = 2e-3
    min_lr_ratio: float = 0.1        # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    precision: str = "auto"          # auto | fp32 | fp16 | bf16
    checkpoint_every: int = 100
    keep_checkpoints: int = 3          # newest ckpt-*.pt kept; best.pt (lowest eval loss) is apart
    eval_every: int = 100              # steps between evaluations on --eval-files (and at the end)
    max_nonfinite_steps: int = 5     # this many skipped (NaN/inf) steps in a row stop the run
    # Positions (text tokens and stacked audio frames) per optimizer step over all ranks; batches
    # are accumulated to reach it. 0: one batch per rank and step.
    tokens_per_step: int = 0
    parallel: str = "ddp"            # under torchrun: ddp (replicas) | fsdp (FSDP2: weights sharded)
    # torch.compile each block: off by default, since it was slower where measured (CPU: 0.28x
    # with recompilation as packed lengths vary; see BENCHMARKS.md); needs Triton (sm_70+) on GPUs.
    compile: bool = False

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("train.lr must be > 0, train.min_lr_ratio in [0, 1], train.warmup_steps >= 0")
        if self.tokens_per_step < 0:
            raise ValueError("train.tokens_per_step must be >= 0 (0: one batch per step)")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel={self.parallel!r}: use ddp or fsdp")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: datasets.DataConfig = field(default_factory=datasets.DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _coerce(value, kind, key: str):
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str) and type(value) is not kind:
        raise ValueError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def build_config(raw: dict) -> Config:
    """Nested dict (config.yaml's shape) -> Config; unknown sections or keys are errors."""
    sections = {}
    for section in dataclasses.fields(Config):
        values = dict(raw.get(section.name) or {})
        cls = section.default_factory().__class__
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(f'{section.name}.{k}' for k in unknown)}")
        sections[section.name] = cls(**{k: _coerce(v, hints[k], f"{section.name}.{k}") for k, v in values.items()})
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ValueError(f"unknown config section(s): {', '.join(unknown)}")
    return Config(**sections)


def load_config(path: str | None, overrides: list[str], preset: str | None = None) -> Config:
    """config.yaml, then the named preset over it, then --set overrides."""
    raw = {}
    if path:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    presets = raw.pop("presets", None) or {}
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"--preset {preset!r}: {path or 'no config'} defines "
                             f"{', '.join(presets) or 'no presets'}")
        for section, values in presets[preset].items():
            if not isinstance(raw.get(section, {}), dict) or not isinstance(values, dict):
                raise ValueError(f"preset {preset}: {section} is not a config section")
            raw[section] = {**(raw.get(section) or {}), **values}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: use section.key=value, e.g. train.steps=100")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"--set {item!r}: {section} is not a config section")
        raw[section][name] = yaml.safe_load(value)
    return build_config(raw)


def accumulation_steps(cfg: Config, world: int) -> int:
    """Batches each rank accumulates per optimizer step to come near train.tokens_per_step."""
    per_batch = cfg.data.batch_size * cfg.data.max_seq_len * world
    return max(1, round(cfg.train.tokens_per_step / per_batch)) if cfg.train.tokens_per_step else 1


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW; matrices and embeddings decay, norms and biases do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type == "cuda")

    def schedule(step: int) -> float:  # linear warmup, cosine decay to a floor
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)




# ---------------------------------------------------------------------------------------------
# Data source

def open_data(args, cfg: Config, cleanup: contextlib.ExitStack, ranks: Ranks = Ranks()):
    """-> (training dataset, evaluation dataset or None), from the remote Flight server or one
    started in this process (shut down by `cleanup`; under torchrun, one per rank). Evaluation
    files never train."""
    layout = datasets.SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
    host, port = args.flight_host, args.port
    token = read_token(args.flight_token_file) if args.flight_token_file else None
    tls_root_cert = Path(args.flight_tls_root_cert).read_bytes() if args.flight_tls_root_cert else None
    if host is None:
        root = args.data_dir
        if root is None:
            if ranks.main:
                demo_corpus.build(DEMO_DIR)
            barrier()
            root = DEMO_DIR / "parquet"
        server = cleanup.enter_context(SampleFlightServer(root, "127.0.0.1", 0))
        host, port, token, tls_root_cert = "127.0.0.1", server.port, None, None
    data = cfg.data

    def dataset(files, shuffle):
        return datasets.ArrowFlightDataset(
            host, port, files, layout, data.batch_size, shuffle=shuffle, seed=data.seed,
            shuffle_window=data.shuffle_window, token=token, tls_root_cert=tls_root_cert,
            max_retries=data.max_retries, retry_backoff_s=data.retry_backoff_s, read_timeout_s=data.read_timeout_s)

    train_set = dataset(args.files, data.shuffle)
    if not args.eval_files:
        return train_set, None
    overlap = sorted(set(train_set.files) & set(args.eval_files))
    if args.files and overlap:
        raise ValueError(f"files both in --files and --eval-files: {', '.join(overlap)}")
    if overlap:   # every served file was listed: hold the evaluation files out
        train_set = dataset([f for f in train_set.files if f not in overlap], data.shuffle)
    return train_set, dataset(args.eval_files, False)


@torch.no_grad()
def evaluate(model, dataset, cfg: Config, device, amp_dtype) -> dict[str, float]:
    """Mean metrics over the evaluation files (every rank's share), weighted by positions; the
    same masks every time."""
    model.eval()
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for index, batch in enumerate(dataset):
        masks = sample_masks(batch, cfg.model, torch.Generator().manual_seed(cfg.train.seed + index)).to(device)
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            loss, metrics = model(batch, masks)   # padding batches too: FSDP ranks gather weights together
        weight = 0 if batch.padding else batch.n_positions(cfg.model.frames_per_position)
        for name, value in {"loss": loss, **metrics}.items():
            totals[name] = totals.get(name, 0.0) + float(value) * weight
            weights[name] = weights.get(name, 0.0) + weight
    model.train()
    if torch.distributed.is_initialized():
        shares = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shares, (totals, weights))
        totals, weights = {}, {}
        for share_totals, share_weights in shares:
            for name in share_totals:
                totals[name] = totals.get(name, 0.0) + share_totals[name]
                weights[name] = weights.get(name, 0.0) + share_weights[name]
    result = {name: totals[name] / weights[name] for name in totals if weights[name] > 0}
    if "loss_text" in result:
        result["text_perplexity"] = math.exp(min(result["loss_text"], 50.0))
    return result


def batches(dataset, num_workers: int):
    """Endless stream of batches from the dataset's epoch and recorded position on."""
    epoch = dataset.epoch
    while True:
        dataset.set_epoch(epoch)   # keeps loaded positions if they belong to this epoch
        resumed = dataset.resuming
        # spawn, not fork: a forked worker would inherit the parent's gRPC client, which is not fork-safe
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                             multiprocessing_context="spawn" if num_workers else None)
        produced = 0
        for batch in loader:
            produced += 1
            yield batch
        if produced == 0 and not resumed:
            raise datasets.DataError("the dataset produced no batches")
        epoch += 1


# ---------------------------------------------------------------------------------------------
# Training

class TrainingHalted(RuntimeError):
    """Training cannot go on; a checkpoint of the last good weights was written."""


@dataclass
class StepResult:
    loss: float           # mean over every rank's batches that hold samples
    metrics: dict         # this rank's, averaged over its accumulated batches
    grad_norm: float
    lr: float             # the rate this step used
    applied: bool         # False: a non-finite loss or gradient, the weights were left alone
    positions: int        # sequence positions trained on, all ranks together
    stop: bool            # some rank was asked to stop (SIGINT/SIGTERM): all stop after this step


def train_step(model, micro_batches, optimizer, scheduler, scaler, device, amp_dtype, grad_clip,
               stop_requested: bool = False) -> StepResult:
    """Forward and backward over the accumulated (batch, masks) pairs, one exchange of gradients
    (and of the loss and stop flag) between ranks, clip, optimizer step.

    A non-finite loss or gradient on any rank skips the optimizer step everywhere; with fp16 the
    GradScaler also skips steps whose scaled gradients overflowed, as it should."""
    optimizer.zero_grad(set_to_none=True)
    loss_sum, samples_batches, positions = torch.zeros((), device=device), 0, 0
    metric_sums: dict[str, torch.Tensor] = {}
    for index, (batch, masks) in enumerate(micro_batches):
        batch, masks = batch.to(device), masks.to(device)
        with gradient_sync(model, enabled=index == len(micro_batches) - 1):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                loss, metrics = model(batch, masks)
            # a padding batch (a rank out of data) steps along with the others, learning nothing
            weight = 0.0 if batch.padding else 1.0 / len(micro_batches)
            scaler.scale(loss * weight).backward()
        if not batch.padding:
            loss_sum = loss_sum + loss.detach().float()
            samples_batches += 1
            positions += batch.n_positions(unwrapped(model).cfg.frames_per_position)
            for name, value in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value
    shared = torch.stack([loss_sum, torch.tensor(float(samples_batches), device=device),
                          torch.tensor(float(positions), device=device), torch.tensor(float(stop_requested), device=device)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(shared)
    loss_total, batch_total, position_total, stops = shared.tolist()
    mean_loss = loss_total / max(batch_total, 1.0)
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
    count = max(samples_batches, 1)
    return StepResult(mean_loss, {name: float(value) / count for name, value in metric_sums.items()},
                      grad_norm, lr, applied, int(position_total), stops > 0)


# ---------------------------------------------------------------------------------------------
# The run: counters, run folder, checkpoints, evaluation, metrics

@dataclass
class Progress:
    """The run's counters, saved at the top level of every checkpoint."""
    step: int = 0                    # optimizer steps done (skipped ones included)
    nonfinite_steps: int = 0         # steps skipped for a NaN/inf loss or gradient, in all
    nonfinite_in_a_row: int = 0
    best_eval_loss: float = math.inf

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for item in dataclasses.fields(self):
            setattr(self, item.name, state.get(item.name, item.default))


class Run:
    """What a run leaves and shows: checkpoints, best.pt and metrics.jsonl in the run folder, the
    live metrics feed, messages. Rank 0 alone writes; every rank calls `checkpoint` and
    `evaluate`, which are collective."""

    def __init__(self, out_dir: Path, ranks: Ranks, live: MetricsServer | None):
        self.out_dir, self.ranks, self.live = out_dir, ranks, live
        self.progress = Progress()
        self.checkpointer: Checkpointer | None = None   # set once model and optimizer exist
        self.evaluation = None                          # () -> metrics, with --eval-files
        self.progress_bar = None
        self._metrics_log = open(out_dir / "metrics.jsonl", "a") if ranks.main else None

    def close(self) -> None:
        if self._metrics_log:
            self._metrics_log.close()

    def say(self, text: str) -> None:
        """A line on the terminal, from rank 0, above the progress bar."""
        if self.ranks.main:
            (self.progress_bar.write if self.progress_bar else functools.partial(print, file=sys.stderr))(text)

    def publish(self, message: dict) -> None:
        """To metrics.jsonl and the live feed (rank 0)."""
        if not self.ranks.main:
            return
        self._metrics_log.write(json.dumps(message) + "\n")
        self._metrics_log.flush()
        if self.live:
            self.live.publish(message)

    def checkpoint(self) -> Path | None:
        path = self.checkpointer.save()
        if path:
            self.publish({"type": "checkpoint", "step": self.progress.step, "path": str(path)})
        return path

    def evaluate(self) -> None:
        """Evaluate on --eval-files; the best evaluation loss so far is kept as best.pt."""
        step, results = self.progress.step, self.evaluation()
        best = results["loss"] < self.progress.best_eval_loss
        if best:
            self.progress.best_eval_loss = results["loss"]
            self.checkpointer.save("best.pt")
        self.publish({"type": "eval", "step": step, "best": best, **results})
        self.say(f"eval at step {step}: loss {results['loss']:.4f}, masked-token accuracy "
                 f"{results.get('text_acc', float('nan')):.3f}" + ("  (best so far: best.pt)" if best else ""))


def open_run(args, ranks: Ranks, cleanup: contextlib.ExitStack) -> tuple[Run, Path | None]:
    """The run folder and live metrics (first, so that a busy port fails before any slow work).
    -> the run, and on rank 0 the checkpoint to resume from (None: a fresh run)."""
    out_dir, resume_path = Path(args.out), None
    if ranks.main:   # rank 0 alone reads and writes the run folder
        out_dir.mkdir(parents=True, exist_ok=True)
        resume_path = (find_checkpoint(out_dir) if args.resume == "auto" else
                       Path(args.resume) if args.resume else None)
        if resume_path is None and any(out_dir.glob("ckpt-*.pt")):
            raise ValueError(f"{out_dir} holds checkpoints of an earlier run: pass --resume auto to "
                             "continue it, or choose another --out")
    live = None
    if args.ws_port >= 0 and ranks.main:
        ws_token = read_token(args.ws_token_file) if args.ws_token_file else None
        live = cleanup.enter_context(MetricsServer(args.ws_host, args.ws_port, ws_token))
    run = Run(out_dir, ranks, live)
    cleanup.callback(run.close)
    if live:
        run.say(f"live metrics: ws://{args.ws_host}:{live.port}  dashboard: http://{args.ws_host}:{live.port}/")
    return run, resume_path


def build_model(cfg: Config, info: datasets.CorpusInfo, device: torch.device) -> CustomTransformer:
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


def train(args, cfg: Config) -> dict:
    # -- Setup: processes and device, run folder, data, model, optimizer, checkpoints ------------
    ranks = init_distributed(cfg.train.device)
    seed_everything(cfg.train.seed)
    device, amp_dtype = choose_device(cfg.train.device, cfg.train.precision, ranks.local_rank)
    with contextlib.ExitStack() as cleanup:
        run, resume_path = open_run(args, ranks, cleanup)
        dataset, eval_set = open_data(args, cfg, cleanup, ranks)
        model = build_model(cfg, datasets.corpus_info(dataset.metadata()), device)
        trained = distribute(model, cfg.train.parallel, ranks, device)
        if ranks.world > 1:
            _HELD_UNTIL_EXIT.append(trained)
        optimizer, scheduler = make_optimizer(trained, cfg.train, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        run.checkpointer = Checkpointer(run.out_dir, cfg.train.keep_checkpoints, ranks, model, optimizer,
                                        pieces={"scheduler": scheduler, "scaler": scaler},
                                        per_rank={"rng": GlobalRNG(), "data": dataset},
                                        progress=run.progress, extra={"config": asdict(cfg)})
        if eval_set is not None:
            # the model itself: with DDP that is the replica's module, which runs without collectives
            run.evaluation = functools.partial(evaluate, model, eval_set, cfg, device, amp_dtype)
        if from_rank0(resume_path is not None):
            run.checkpointer.load(load_checkpoint(resume_path) if ranks.main else None)
            run.say(f"resumed from {resume_path} at step {run.progress.step}")

        accumulate = accumulation_steps(cfg, ranks.world)
        flops_per_position = model.flops_per_position(cfg.data.max_seq_len)
        peak = peak_flops(device, amp_dtype)
        run.say(f"{ranks.world} process(es) x {accumulate} batch(es) x {cfg.data.batch_size} x "
                f"{cfg.data.max_seq_len} positions per step on {device} ({str(amp_dtype).removeprefix('torch.')})"
                + ("" if peak or device.type == "cpu" else f"; MFU unknown: no peak FLOP/s listed for "
                                                           f"{torch.cuda.get_device_name(device)}"))
        start_step = run.progress.step
        run.publish({"type": "run", "parameters": sum(p.numel() for p in model.parameters()), "device": str(device),
                     "precision": str(amp_dtype).removeprefix("torch."), "processes": ranks.world,
                     "batches_per_step": accumulate, "files": len(dataset.files), "config": asdict(cfg),
                     "start_step": start_step, "steps": cfg.train.steps})
        # SIGINT/SIGTERM: finish the step in flight, checkpoint, exit cleanly (all ranks together).
        stop_requested = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            cleanup.callback(signal.signal, sig, signal.signal(sig, lambda s, f: stop_requested.append(s)))
        stream = datasets.prefetch(batches(dataset, cfg.data.num_workers), cfg.data.prefetch)
        cleanup.callback(stream.close)   # stop reading before the in-process server goes away
        mask_rng = torch.Generator()
        run.progress_bar = cleanup.enter_context(tqdm(
            total=cfg.train.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
            disable=not ranks.main))

        # -- The loop -------------------------------------------------------------------------------
        losses, last_path = [], None
        trained.train()
        try:
            for step in range(start_step, cfg.train.steps):
                # 1. This rank's batches for the step, each with its masks (which depend on the
                #    step, batch and rank alone, so a resumed run draws the same ones).
                t0 = time.perf_counter()
                micro_batches, data_wait = [], 0.0
                for micro in range(accumulate):
                    waited = time.perf_counter()
                    batch = next(stream)
                    data_wait += time.perf_counter() - waited
                    dataset.record(batch)
                    mask_rng.manual_seed(cfg.train.seed * 1_000_003 + (step * accumulate + micro) * ranks.world
                                         + ranks.rank)
                    micro_batches.append((batch, sample_masks(batch, cfg.model, mask_rng)))

                # 2. Forward, backward, one exchange between ranks, optimizer step (or a skip).
                result = train_step(trained, micro_batches, optimizer, scheduler, scaler, device, amp_dtype,
                                    cfg.train.grad_clip, bool(stop_requested))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step_time = time.perf_counter() - t0
                progress = run.progress
                progress.step = done = step + 1
                progress.nonfinite_in_a_row = 0 if result.applied else progress.nonfinite_in_a_row + 1
                progress.nonfinite_steps += not result.applied

                # 3. Metrics: metrics.jsonl, live feed, progress bar.
                tokens_per_s = result.positions / step_time
                record = {"type": "step", "step": done, "epoch": batch.resume_from.epoch, "loss": result.loss,
                          **result.metrics, "lr": result.lr, "grad_norm": result.grad_norm,
                          "tokens_per_s": tokens_per_s, "step_time_s": step_time,
                          "data_wait_frac": data_wait / step_time, "peak_mem_gb": peak_memory_gb(device),
                          "mfu": flops_per_position * tokens_per_s / (peak * ranks.world) if peak else None,
                          "skipped": not result.applied, "nonfinite_steps": progress.nonfinite_steps}
                run.publish({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                             for k, v in record.items()})
                losses.append(result.loss)
                run.progress_bar.update()
                run.progress_bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{tokens_per_s:.0f}",
                                             acc=f"{result.metrics.get('accuracy', 0.0):.3f}")

                # 4. Too many non-finite steps in a row: keep the last good weights and stop.
                if progress.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    last_path = run.checkpoint()   # the skipped steps left the weights untouched
                    raise TrainingHalted(
                        f"{progress.nonfinite_in_a_row} steps in a row (up to step {done}) had a non-finite "
                        f"loss or gradient; stopped with checkpoint {last_path}. Bad data is the usual cause: "
                        f"check the files with `python schema.py FILE_OR_FOLDER ...` (it names every NaN/inf "
                        f"value by file, row and column); otherwise lower train.lr.")

                # 5. Evaluation and checkpoints; a requested stop ends the run here.
                if eval_set is not None and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                    run.evaluate()
                if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps or result.stop:
                    last_path = run.checkpoint()
                if result.stop:
                    run.say(f"asked to stop: stopped after step {done}, checkpoint {last_path}")
                    break
        except Exception as err:
            run.publish({"type": "failed", "step": run.progress.step, "error": f"{type(err).__name__}: {err}"})
            raise
        run.publish({"type": "finished", "step": start_step + len(losses),
                     "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                     "checkpoint": str(last_path) if last_path else None})
    return {"losses": losses, "checkpoint": last_path, "main": ranks.main}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flight-host", help="Flight server address; omit for the embedded in-process server")
    parser.add_argument("--port", type=int, default=8815, help="Flight server port")
    parser.add_argument("--files", nargs="+", help="files to train on, as the server names them (default: all)")
    parser.add_argument("--eval-files", nargs="+", help="files to evaluate on (held out of training)")
    parser.add_argument("--flight-token-file", help="file holding the server's bearer token")
    parser.add_argument("--flight-tls-root-cert", help="PEM certificate to trust: connect over TLS")
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
    if argv[:1] == ["watch"]:   # python model_trainer.py watch ws://HOST:PORT
        if len(argv) != 2:
            print("usage: model_trainer.py watch ws://HOST:PORT[/?token=...]", file=sys.stderr)
            return 2
        return live_metrics.watch(argv[1])
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set + ([f"train.steps={args.steps}"] if args.steps else []), args.preset)
    except (ValueError, OSError, yaml.YAMLError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        result = train(args, cfg)
    except (ValueError, OSError, datasets.DataError, TrainingHalted) as err:
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
