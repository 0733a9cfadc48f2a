"""What a run shows between its steps: its status when it changes, and the data client's
warnings (retries, failover, a server lost) on the terminal and in the live feed."""
import json
import logging

from config import TrainConfig
from parallel import Ranks
from training_run import DataMessages, Run


def published(out):
    """metrics.jsonl, less each message's time (checked to be there)."""
    messages = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m.pop("time") > 1.7e9 for m in messages)
    return messages


def test_a_status_is_published_when_it_changes_and_a_wait_once_per_wait(tmp_path, capsys):
    run = Run(tmp_path, Ranks(), None, TrainConfig())
    run.status("evaluating")
    run.status("evaluating")                 # no change: nothing new
    run.waiting_for_data(2.5)
    run.waiting_for_data(3.5)                # the same wait goes on: said once
    run.status("checkpointing")
    run.close()
    told = published(tmp_path)
    assert [m["state"] for m in told] == ["evaluating", "waiting for data", "checkpointing"]
    assert told[1]["since"] > 0 and all(m["type"] == "status" and m["step"] == 0 for m in told)
    assert capsys.readouterr().err.count("waiting for data") == 1


def test_the_data_client_s_warnings_reach_the_terminal_and_the_feed(tmp_path, capsys):
    run = Run(tmp_path, Ranks(), None, TrainConfig())
    log, handler = logging.getLogger("mmtrain.data"), DataMessages(run)
    log.addHandler(handler)
    try:
        log.warning("reading %s from row %d at %s failed: %s; retry %d of %d in %.1f s", "a.parquet", 120,
                    "grpc://10.0.0.2:8815", "connection refused", 1, 8, 0.5)
        log.info("not a warning: not shown")
    finally:
        log.removeHandler(handler)
        run.close()
    text = "reading a.parquet from row 120 at grpc://10.0.0.2:8815 failed: connection refused; retry 1 of 8 in 0.5 s"
    assert published(tmp_path) == [{"type": "data", "step": 0, "level": "warning", "message": text}]
    assert text in capsys.readouterr().err
