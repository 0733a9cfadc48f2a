"""What a run leaves and shows: the run folder (checkpoints, best.pt, metrics.jsonl), the live
metrics feed, messages, and the counters and pieces a checkpoint keeps; the checks a resume
makes (which checkpoint, on which machine) and the label heads' finish at the end (the
sentiment head refit, the training speakers enrolled).
Rank 0 alone writes; every rank calls what is collective.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import inference
import schema
from access import read_token
from checkpoint import Checkpointer, CheckpointWriteError, load_checkpoint, newest_checkpoint
from config import TrainConfig
from live_metrics import MetricsServer, json_ready
from parallel import Ranks, all_ranks, describe_device, dtype_name, from_rank0, peak_memory_gb
from step_feed import Step, StepResult


class TrainingHalted(RuntimeError):
    """Training cannot go on; a checkpoint of the last good weights was written."""


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


@dataclass
class Meter:
    """What a step's throughput and model FLOPs utilisation are computed with."""
    device: torch.device
    flops_per_position: float
    peak: float | None        # the device's peak FLOP/s, None where unknown


class Run:
    """What a run leaves and shows: checkpoints, best.pt and metrics.jsonl in the run folder, the
    live metrics feed, messages. Rank 0 alone writes; every rank calls `checkpoint` and
    `evaluate`, which are collective."""

    def __init__(self, out_dir: Path, ranks: Ranks, live: MetricsServer | None, cfg: TrainConfig):
        self.out_dir, self.ranks, self.live, self.cfg = out_dir, ranks, live, cfg
        self.progress = Progress()
        self.checkpointer: Checkpointer | None = None   # set once model and optimizer exist
        self.evaluation = None                          # () -> metrics, with --eval-files
        self.finish = None                              # () refits the label heads, enrols the speakers
        self.meter: Meter | None = None                 # what a step's throughput and MFU are computed with
        self.progress_bar = None
        self.last_checkpoint: tuple[int, Path] | None = None   # (step, path) of the newest one written
        self._metrics_log = open(out_dir / "metrics.jsonl", "a") if ranks.main else None
        self._status: tuple[str, dict] = ("", {})
        self._writing = threading.Lock()   # the data client's messages come from its reading thread

    def close(self) -> None:
        if self._metrics_log:
            self._metrics_log.close()

    def say(self, text: str) -> None:
        """A line on the terminal, from rank 0, above the progress bar."""
        if self.ranks.main:
            if self.progress_bar:
                self.progress_bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr)

    def publish(self, message: dict) -> None:
        """To metrics.jsonl and the live feed (rank 0)."""
        if not self.ranks.main:
            return
        message = {**message, "time": round(time.time(), 3)} if "time" not in message else message
        with self._writing:
            self._metrics_log.write(json.dumps(message) + "\n")
            self._metrics_log.flush()
        if self.live:
            self.live.publish(message)

    def status(self, state: str, **detail) -> None:
        """What the run is doing between steps (evaluating, checkpointing, waiting for data...),
        published when it changes; a step's metrics say it is training again."""
        if (state, detail) != self._status:
            self._status = (state, detail)
            self.publish({"type": "status", "state": state, "step": self.progress.step, **detail})

    def waiting_for_data(self, waited_s: float) -> None:
        """The step feed has waited this long for a batch (a server slow, down, or failing over)."""
        if self._status[0] != "waiting for data":
            self.say(f"step {self.progress.step + 1}: waiting for data ({waited_s:.0f} s so far)")
            self.status("waiting for data", since=time.time() - waited_s)

    def data_message(self, text: str, level: str) -> None:
        """A retry, failover or lost server reported by the data client: said and published."""
        self.say(text)
        self.publish({"type": "data", "step": self.progress.step, "level": level, "message": text})

    def _save(self, name: str | None = None, final: bool = False) -> tuple[bool, Path | None]:
        """Write a checkpoint; every rank learns whether rank 0 could. -> (written, the path on
        rank 0). A failed write stops the run (CheckpointWriteError) unless
        train.on_checkpoint_error=continue and more steps follow."""
        path, failure = None, None
        try:
            path = self.checkpointer.save(name)
        except CheckpointWriteError as err:   # rank 0 alone writes, so only it can fail here
            failure = str(err)
        failure = from_rank0(failure)
        if failure is None:
            return True, path
        kept = (f"the last good checkpoint is {self.last_checkpoint[1]} (step {self.last_checkpoint[0]})"
                if self.last_checkpoint else "no checkpoint of this run was written yet")
        self.publish({"type": "checkpoint_failed", "step": self.progress.step, "error": failure})
        if self.cfg.on_checkpoint_error == "continue" and not final:
            self.say(f"{failure}; training goes on (train.on_checkpoint_error=continue) and tries again at the "
                     f"next interval; {kept}")
            return False, None
        raise CheckpointWriteError(f"{failure}. Stopped at step {self.progress.step}; {kept}. Free some space "
                                   f"(or choose another --out) and resume with --resume auto")

    def checkpoint(self, final: bool = False) -> Path | None:
        """ckpt-STEP.pt for the last finished step (once: a step already saved is not saved again)."""
        step = self.progress.step
        if self.last_checkpoint and self.last_checkpoint[0] == step:
            return self.last_checkpoint[1]
        if step == 0:
            return None
        self.status("checkpointing")
        written, path = self._save(final=final)
        if written:
            self.last_checkpoint = (step, path)
            self.publish({"type": "checkpoint", "step": step, "path": str(path),
                          "bytes": path.stat().st_size if path and path.exists() else None})
        return path

    def abandon(self, missing: Exception | None, stop: bool) -> Path | None:
        """A step some rank could not get its batches for: keep the last finished step's
        checkpoint (-> its path); a stop asked for while waiting ends the run, data that stayed
        away fails it."""
        path = self.checkpoint(final=True)
        saved = (f"the checkpoint of step {self.last_checkpoint[0]}" + (f", {path}" if path else "")
                 if self.last_checkpoint else "nothing to save (no step had finished)")
        if isinstance(missing, schema.DataError) or not stop:
            reason = missing if isinstance(missing, schema.DataError) else \
                "another process could not read its data (its error is above)"
            raise schema.DataError(f"{reason}\nThe run stopped with {saved}; when the data is back, continue "
                                     f"with --resume auto")
        self.say(f"asked to stop while waiting for data: stopped with {saved}")
        return path

    def after_step(self, result: StepResult, this: Step, step_time: float) -> int:
        """Count the step, log its metrics (metrics.jsonl, live feed, progress bar); too many
        non-finite steps in a row stop the run with the last good weights. -> steps done."""
        meter = self.meter
        if meter.device.type == "cuda":
            torch.cuda.synchronize(meter.device)
        progress = self.progress
        progress.step = done = progress.step + 1
        self._status = ("training", {})
        progress.nonfinite_in_a_row = 0 if result.applied else progress.nonfinite_in_a_row + 1
        progress.nonfinite_steps += not result.applied
        tokens_per_s = result.positions / step_time
        record = {"type": "step", "step": done, "epoch": this.epoch, "loss": result.loss, **result.metrics,
                  "lr": result.lr, "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
                  "step_time_s": step_time, "data_wait_frac": this.data_wait_s / step_time,
                  "peak_mem_gb": peak_memory_gb(meter.device),
                  "mfu": meter.flops_per_position * tokens_per_s / (meter.peak * self.ranks.world) if meter.peak else None,
                  "skipped": not result.applied, "nonfinite_steps": progress.nonfinite_steps}
        self.publish(json_ready(record))
        self.progress_bar.update()
        self.progress_bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{tokens_per_s:.0f}",
                                      acc=f"{result.metrics.get('accuracy', 0.0):.3f}")
        if progress.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            path = self.checkpoint(final=True)   # the skipped steps left the weights untouched
            raise TrainingHalted(
                f"{progress.nonfinite_in_a_row} steps in a row (up to step {done}) had a non-finite loss or "
                f"gradient; stopped with checkpoint {path}. Bad data is the usual cause: check the files with "
                f"`python schema.py FILE_OR_FOLDER ...` (it names every NaN/inf value by file, row and column); "
                f"otherwise lower train.lr.")
        return done

    def end_of_step(self, done: int, stop: bool) -> Path | None:
        """At the last step the label heads finished (sentiment refit, speakers enrolled);
        evaluation every train.eval_every steps and at the end, a checkpoint every
        train.checkpoint_every steps and at the end (or a stop). -> the checkpoint written, if one was."""
        cfg, last = self.cfg, done == self.cfg.steps
        if last and self.finish is not None:
            self.status("finishing the label heads")
            self.finish()
        if self.evaluation is not None and (done % cfg.eval_every == 0 or last):
            self.status("evaluating")
            self.evaluate()
        if done % cfg.checkpoint_every == 0 or last or stop:
            return self.checkpoint(final=last or stop)
        return None

    def evaluate(self) -> None:
        """Evaluate on --eval-files; the best evaluation loss so far is kept as best.pt."""
        step, results = self.progress.step, self.evaluation()
        best = results["loss"] < self.progress.best_eval_loss
        if best:
            self.progress.best_eval_loss = results["loss"]
            self._save("best.pt")
        self.publish({"type": "eval", "step": step, "best": best, **results})
        unseen = results["unseen_speakers"]
        self.say(f"eval at step {step}: loss {results['loss']:.4f}, masked-token accuracy "
                 f"{results.get('text_acc', float('nan')):.3f}, speaker {results.get('speaker_acc', float('nan')):.3f}, "
                 f"sentiment {results.get('sentiment_acc', float('nan')):.3f}"
                 + ("  (best so far: best.pt)" if best else "")
                 + (f"; {sum(unseen.values())} segment(s) of speakers unseen in training ({', '.join(unseen)}) "
                    "were not scored for speaker" if unseen else ""))


class Enrolled:
    """The checkpoint piece that holds the training speakers' enrolment (empty until the run ends)."""

    def __init__(self):
        self.state: dict = {}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


FINISH_PER_LABEL = 256   # segments read per training speaker (and per sentiment) at the end of a run


def finish_label_heads(model, dataset, parallel_mode: str, ranks: Ranks, device, say) -> dict:
    """At the end of a run rank 0 reads the training files as `predict` does, refits the
    sentiment head on them (refit.py) and enrols their speakers (predict then names speakers by
    cosine score and says unknown below a calibrated threshold); every rank takes the refit
    head. -> the enrolment's state. Under FSDP the model's forward is collective: the user
    finishes the checkpoint with `model_trainer.py enroll --refit-sentiment`."""
    finished = {}
    if parallel_mode == "fsdp" and ranks.world > 1:
        say("sentiment head kept as trained and speakers not enrolled (FSDP): run model_trainer.py enroll "
            "--refit-sentiment --checkpoint CKPT with the training files")
    elif ranks.main:
        readings = inference.read_segments(model, dataset, device, per_label=FINISH_PER_LABEL)
        say(inference.refit_sentiment_head(model, readings))
        finished["sentiment_head"] = {name: value.detach().cpu() for name, value in
                                      model.sentiment_head.state_dict().items()}
        try:
            enrolment, counts = inference.enrol_speakers(readings)
            finished["enrolment"] = enrolment.state_dict()
            say(inference.describe_enrolment(enrolment, counts))
        except ValueError as err:   # no speaker names in the training files
            say(f"speakers not enrolled: {err}")
    finished = from_rank0(finished)
    if "sentiment_head" in finished:
        model.sentiment_head.load_state_dict(finished["sentiment_head"])
    return finished.get("enrolment", {})


def open_run(args, cfg: TrainConfig, ranks: Ranks, cleanup: contextlib.ExitStack
             ) -> tuple[Run, Path | None, dict | None]:
    """The run folder and live metrics (first, so that a busy port or a folder that cannot be
    written fails before any slow work). -> the run, and on rank 0 the checkpoint to resume from
    and its state (None: a fresh run)."""
    out_dir, resume_path, saved = Path(args.out), None, None
    if ranks.main:   # rank 0 alone reads and writes the run folder
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out_dir):
                pass
        except OSError as err:
            raise OSError(f"--out {out_dir}: cannot write there: {err.strerror or err}") from None
        problems: list[str] = []
        if args.resume == "auto":
            resume_path, saved = newest_checkpoint(out_dir, problems) or (None, None)
        elif args.resume:
            resume_path = Path(args.resume)
            saved = load_checkpoint(resume_path)
        if resume_path is None and problems:
            raise ValueError(f"--resume auto: none of the {len(problems)} checkpoint(s) in {out_dir} can be read:\n  "
                             + "\n  ".join(problems) + f"\nTo start afresh, move them out of {out_dir} or choose "
                             "another --out")
        if resume_path is None and any(out_dir.glob("ckpt-*.pt")):
            raise ValueError(f"{out_dir} holds checkpoints of an earlier run: pass --resume auto to "
                             "continue it, or choose another --out")
    if args.resume == "auto":
        check_checkpoints_reach_rank0(out_dir, ranks)
    live = None
    if args.ws_port >= 0 and ranks.main:
        ws_token = read_token(args.ws_token_file) if args.ws_token_file else None
        live = cleanup.enter_context(MetricsServer(args.ws_host, args.ws_port, ws_token))
    run = Run(out_dir, ranks, live, cfg)
    cleanup.callback(run.close)
    if ranks.main:
        data_log, handler = logging.getLogger("mmtrain.data"), DataMessages(run)
        data_log.addHandler(handler)
        cleanup.callback(data_log.removeHandler, handler)
    if live:
        run.say(f"live metrics: ws://{args.ws_host}:{live.port}  dashboard: http://{args.ws_host}:{live.port}/")
    where = f" on {socket.gethostname()} (the machine of rank 0)" if ranks.world > 1 else ""
    run.say(f"checkpoints: {out_dir.resolve()}{where}")
    if args.resume == "auto" and resume_path is None:
        run.say(f"--resume auto: no checkpoint in {out_dir}: starting at step 0")
    return run, resume_path, saved


class DataMessages(logging.Handler):
    """The data client's warnings (a retry, a failover to a replica, a server lost) on the run's
    terminal and in its live feed."""

    def __init__(self, run: Run):
        super().__init__(logging.WARNING)
        self.run = run

    def emit(self, record: logging.LogRecord) -> None:
        self.run.data_message(record.getMessage(), record.levelname.lower())


def check_checkpoints_reach_rank0(out_dir: Path, ranks: Ranks) -> None:
    """Under torchrun over several machines only rank 0 reads and writes checkpoints, on its own
    disk. A run resumed with rank 0 on another machine than before would start afresh there:
    every rank looks in --out, and a newer checkpoint on any other machine is an error (on all
    ranks alike, so none waits for the others)."""
    def newest(folder):
        names = sorted(p.name for p in folder.glob("ckpt-*.pt")) if folder.is_dir() else []
        return names[-1] if names else ""

    seen = all_ranks((socket.gethostname(), newest(out_dir)))
    host0, newest0 = seen[0]
    ahead = [(rank, host, name) for rank, (host, name) in enumerate(seen) if host != host0 and name > newest0]
    if ahead:
        rank, host, name = ahead[0]
        raise ValueError(f"--resume auto: {out_dir} on {host} (rank {rank}) holds {name}, but rank 0 runs on {host0}, "
                         f"which has {newest0 or 'no checkpoint'} there: only rank 0 reads checkpoints. Start rank 0 on "
                         f"{host} (torchrun --rdzv_backend static --node_rank 0 --master_addr {host} there), or copy "
                         f"the checkpoints to {host0}")


def describe_run(s, eval_set, threads: int) -> None:
    """The run's description (`s`: model_trainer's Session): on the terminal, and as the live feed's
    first message."""
    cfg, run, feed = s.cfg, s.run, s.feed
    # A resumed epoch finishes with the work it was dealt by; this run's applies from the next.
    following = s.dataset.work(feed.epoch + 1)
    if following != (feed.per_step, feed.batch_sizes):
        run.say(f"epoch {feed.epoch} continues with the checkpoint's work; from epoch {feed.epoch + 1} on, processes "
                f"take {following[0]} batch(es) of {following[1]} sequence(s) a step")
    run.say(f"{len(s.labels.speakers)} speaker(s) by name, {len(s.dataset.files)} training file(s)"
            + (f", {len(eval_set.files)} evaluation file(s)" if eval_set else ""))
    precision = dtype_name(s.amp_dtype)
    sharing = s.ranks.sharing
    for rank, (where, dtype, cpu_threads) in enumerate(all_ranks((describe_device(s.device), precision, threads))):
        group = rank // sharing   # with context parallelism: the group's share, a slice of each sequence
        run.say(f"process {rank}: {where} ({dtype}, {cpu_threads} CPU thread(s)), {feed.per_step[group]} batch(es) x "
                f"{feed.batch_sizes[group]} x {cfg.data.max_seq_len} positions per step"
                + (f", slice {rank % sharing + 1} of {sharing} of each" if sharing > 1 else ""))
    if not run.meter.peak and s.device.type != "cpu":
        run.say(f"MFU unknown: no peak FLOP/s listed for {torch.cuda.get_device_name(s.device)}")
    run.publish({"type": "run", "parameters": sum(p.numel() for p in s.model.parameters()), "device": str(s.device),
                 "precision": precision, "processes": s.ranks.world,
                 "batches_per_step": feed.per_step[s.ranks.data_rank], "batches_per_step_by_process": feed.per_step,
                 "batch_size_by_process": feed.batch_sizes, "files": len(s.dataset.files), "config": asdict(cfg),
                 "start_step": run.progress.step, "steps": cfg.train.steps})
