"""The WebSocket metrics thread: late joiners get history, stalled clients are dropped."""
import base64
import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect

from config import TrainConfig
from live_metrics import History, MetricsServer, format_message
from parallel import Ranks
from training_run import Run
from util import wait_for

ROOT = Path(__file__).resolve().parents[1]


def test_late_joiner_gets_run_info_then_history_then_live_updates():
    with MetricsServer("127.0.0.1", 0) as server:
        server.publish({"type": "run", "steps": 3})
        for step in (1, 2):
            server.publish({"type": "step", "step": step, "loss": 1.0 / step})
        assert wait_for(lambda: len(server.history) == 2)
        with connect(f"ws://127.0.0.1:{server.port}") as ws:
            got = [json.loads(ws.recv(timeout=5)) for _ in range(3)]
            server.publish({"type": "step", "step": 3, "loss": 0.3})
            got.append(json.loads(ws.recv(timeout=5)))
    assert [m["type"] for m in got] == ["run", "step", "step", "step"]
    assert [m.get("step") for m in got[1:]] == [1, 2, 3]


def test_history_keeps_every_event_the_recent_steps_exactly_and_the_older_ones_thinned():
    history = History(recent=100, older=100)
    for step in range(1, 10_001):
        history.add(json.dumps({"type": "step", "step": step}), True)
        if step % 1000 == 0:
            history.add(json.dumps({"type": "checkpoint", "step": step}), False)
    kept = [json.loads(text) for text in history.messages()]
    steps = [m["step"] for m in kept if m["type"] == "step"]
    assert [m["step"] for m in kept if m["type"] == "checkpoint"] == list(range(1000, 10_001, 1000))
    assert steps == sorted(steps) and steps[0] == 1 and steps[-100:] == list(range(9901, 10_001))
    assert len(steps) <= 100 + 2 * 100
    # the thinned ones evenly spaced (the stride), those since the last thinning all there
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    stride = max(gaps)
    assert stride == history.stride >= 64 and len(set(gaps) - {stride, 1}) <= 1   # and where the two meet
    assert gaps == sorted(gaps, reverse=True)
    # events stay where they happened among the steps
    order = [(m["step"], m["type"] == "step") for m in kept]
    assert order == sorted(order, key=lambda item: (item[0], not item[1]))


def test_a_client_that_connects_late_gets_the_whole_run_from_step_1():
    with MetricsServer("127.0.0.1", 0) as server:
        server.publish({"type": "run", "steps": 5000})
        for step in range(1, 8001):
            server.publish({"type": "step", "step": step, "loss": 1.0 / step})
        server.publish({"type": "eval", "step": 8000, "loss": 0.5})
        assert wait_for(lambda: json.loads(server.history.messages()[-1])["type"] == "eval")
        with connect(f"ws://127.0.0.1:{server.port}") as ws:
            got = [json.loads(ws.recv(timeout=10)) for _ in range(len(server.history) + 1)]
            server.publish({"type": "step", "step": 8001, "loss": 0.1})
            got.append(json.loads(ws.recv(timeout=10)))
    steps = [m["step"] for m in got if m["type"] == "step"]
    assert got[0]["type"] == "run" and steps[0] == 1 and steps[-2001:] == list(range(6001, 8002))
    assert len(steps) < 6000   # thinned, the older ones
    assert got[-2]["type"] == "eval"


def test_a_stalled_client_is_dropped_while_others_keep_receiving():
    with MetricsServer("127.0.0.1", 0) as server:
        stalled = socket.create_connection(("127.0.0.1", server.port))
        stalled.sendall("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        assert wait_for(lambda: len(server._clients) == 1)
        with connect(f"ws://127.0.0.1:{server.port}") as reader:
            assert wait_for(lambda: len(server._clients) == 2)
            payload = "x" * 20_000
            received = 0
            for step in range(3000):      # ~60 MB: far beyond what socket buffers absorb
                server.publish({"type": "step", "step": step, "pad": payload})
                if step % 50 == 0:        # the healthy client keeps up: read up to this step
                    while json.loads(reader.recv(timeout=10)).get("step") != step:
                        received += 1
                    received += 1
            assert wait_for(lambda: len(server._clients) == 1)   # only the reader is left
        stalled.close()
    assert received > 2000


def test_a_busy_port_is_a_clear_error():
    with MetricsServer("127.0.0.1", 0) as first:
        with pytest.raises(OSError, match=f"cannot serve metrics on ws://127.0.0.1:{first.port}"):
            MetricsServer("127.0.0.1", first.port).start()


def test_watch_lines_are_readable():
    line = format_message({"type": "step", "step": 12, "loss": 1.23456, "accuracy": 0.5, "lr": 1e-3,
                           "tokens_per_s": 4321.0})
    assert line == "step     12  loss 1.2346  acc 0.500  lr 1.00e-03  4321 tok/s"
    # A skipped (non-finite) step is published with null loss and metrics: the line says so.
    skipped = format_message({"type": "step", "step": 13, "loss": None, "accuracy": None, "lr": 1e-3,
                              "tokens_per_s": 4000.0, "skipped": True})
    assert skipped == "step     13  loss -  acc -  lr 1.00e-03  4000 tok/s  skipped (non-finite loss or gradient)"
    # events in words, as the dashboard says them
    assert format_message({"type": "checkpoint", "step": 300, "path": "runs/a/ckpt-00000300.pt", "bytes": 12_345_678,
                           "time": 1.8e9}) == "step 300: checkpoint written: runs/a/ckpt-00000300.pt (12.3 MB)"
    assert format_message({"type": "data", "step": 7, "level": "warning", "message": "reading a.parquet failed: x; "
                           "retry 1 of 8 in 0.5 s"}) == "step 7: data: reading a.parquet failed: x; retry 1 of 8 in 0.5 s"
    assert format_message({"type": "eval", "step": 40, "loss": 1.23456, "best": True, "text_acc": 0.5}) == \
        "step 40: evaluation: held-out loss 1.2346 (best so far), masked tokens 0.500"
    waiting = format_message({"type": "status", "step": 9, "state": "waiting for data", "since": 1.8e9})
    assert re.fullmatch(r"step 9: waiting for data \(since \d\d:\d\d:\d\d\)", waiting), waiting
    assert format_message({"type": "finished", "step": 12, "steps": 400, "checkpoint": "c"}) == \
        "stopped at step 12 of 400 (asked to stop)"


def test_the_same_port_serves_the_dashboard_page():
    with MetricsServer("127.0.0.1", 0) as server:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5) as response:
            page = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/html")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/uPlot.iife.min.js", timeout=5) as response:
            library = response.read()
            assert response.headers["Content-Type"].startswith("text/javascript")
    assert 'src="/uPlot.iife.min.js"' in page and "new WebSocket" in page and "https://" not in page   # no CDN
    assert library == (ROOT / "vendor" / "uplot" / "uPlot.iife.min.js").read_bytes() and b"uPlot" in library


def test_a_token_guards_both_websocket_and_page():
    import urllib.error
    from websockets.exceptions import InvalidStatus
    with pytest.raises(ValueError, match="needs a token"):
        MetricsServer("0.0.0.0", 0)
    with MetricsServer("127.0.0.1", 0, token="t0k") as server:
        server.publish({"type": "run", "steps": 1})
        with pytest.raises(InvalidStatus):
            connect(f"ws://127.0.0.1:{server.port}/ws?token=wrong", open_timeout=5)
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5)
        with connect(f"ws://127.0.0.1:{server.port}/ws?token=t0k", open_timeout=5) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "run"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/?token=t0k", timeout=5) as response:
            assert response.status == 200
        # the page's chart library is loaded without the token (a script tag cannot add it): no secret in it
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/uPlot.iife.min.js", timeout=5) as response:
            assert response.status == 200


def test_the_watch_command_prints_one_line_per_update():
    with MetricsServer("127.0.0.1", 0) as server:
        server.publish({"type": "run", "parameters": 10, "device": "cpu", "precision": "float32", "files": 1,
                        "start_step": 0, "steps": 2})
        for step in (1, 2):
            server.publish({"type": "step", "step": step, "loss": 1.0 / step, "accuracy": 0.5, "lr": 1e-3,
                            "tokens_per_s": 100.0})
        assert wait_for(lambda: len(server.history) == 2)
        watcher = subprocess.Popen([sys.executable, "model_trainer.py", "watch", f"ws://127.0.0.1:{server.port}"],
                                   cwd=ROOT, stdout=subprocess.PIPE, text=True)
        lines = [watcher.stdout.readline().strip() for _ in range(3)]
    assert watcher.wait(timeout=30) == 0   # the server closing ends the watch
    assert lines[0].startswith("run: 10 parameters on cpu")
    assert lines[1].startswith("step      1  loss 1.0000") and lines[2].startswith("step      2  loss 0.5000")


def test_a_watcher_that_connects_before_the_run_describes_itself_waits_for_the_description():
    with MetricsServer("127.0.0.1", 0) as server:
        watcher = subprocess.Popen([sys.executable, "model_trainer.py", "watch", f"ws://127.0.0.1:{server.port}"],
                                   cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert wait_for(lambda: len(server._clients) == 1, timeout=120)
        server.publish({"type": "run", "parameters": 1234, "device": "cpu", "precision": "float32", "files": 3,
                        "start_step": 0, "steps": 9})
        first = watcher.stdout.readline().strip()
    assert watcher.wait(timeout=30) == 0
    assert first == "run: 1,234 parameters on cpu (float32), 3 files, steps 0..9"


def test_watch_help_is_a_usage_text():
    proc = subprocess.run([sys.executable, "model_trainer.py", "watch", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "usage: model_trainer.py watch" in proc.stdout and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "model_trainer.py", "watch"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "the following arguments are required: url" in proc.stderr


@contextlib.contextmanager
def browser_tab(browser: str, profile):
    """A tab of headless Chromium, driven over the DevTools protocol (a WebSocket, so the
    `websockets` client we ship is all it takes)."""
    process = subprocess.Popen(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1400,1600", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            if match := re.search(r"DevTools listening on ws://([^/]+)/", line):
                break
        else:
            raise RuntimeError("Chromium exited before it opened its DevTools port")
        with urllib.request.urlopen(f"http://{match.group(1)}/json/list", timeout=10) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as socket_:
            yield Tab(socket_)
    finally:
        process.kill()
        process.wait()


class Tab:
    def __init__(self, socket_):
        self.socket, self.calls = socket_, 0

    def call(self, method: str, **params):
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv(timeout=30))
            if reply.get("id") == self.calls:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def chromium():
    browser = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
    if browser is None:
        pytest.skip("no headless Chromium (Debian package 'chromium'): the dashboard browser test did not run")
    return browser


def screenshot(tab, path, width, height):
    tab.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
    time.sleep(0.5)   # the charts follow the width on the next animation frame
    path.write_bytes(base64.b64decode(tab.call("Page.captureScreenshot", format="png")["data"]))
    return tab.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")


def test_the_dashboard_in_a_real_browser_draws_a_live_training_run(corpus, tmp_path):
    """Headless Chromium opens the dashboard while the trainer runs, waits until the loss chart
    holds points, reads a value under the pointer, and saves a screenshot (in the test's tmp
    folder)."""
    browser = chromium()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ws_port = s.getsockname()[1]
    trainer = subprocess.Popen(
        [sys.executable, "model_trainer.py", "--data-dir", str(corpus[0]), "--out", str(tmp_path / "run"),
         "--ws-port", str(ws_port), "--preset", "tiny", "--steps", "400", "--set", "train.checkpoint_every=400"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with browser_tab(browser, tmp_path / "profile") as tab:
            assert wait_for(lambda: _serves(ws_port), timeout=120), "the trainer never served its dashboard"
            tab.call("Page.navigate", url=f"http://127.0.0.1:{ws_port}/")
            points = 'Number(document.querySelector("[data-chart=loss]").dataset.points || 0)'
            assert wait_for(lambda: (tab.evaluate(points) or 0) >= 5, timeout=120), "the loss chart stayed empty"
            time.sleep(0.5)   # let the next animation frame paint
            status = tab.evaluate('document.getElementById("status").textContent')
            header = tab.evaluate('document.getElementById("run").textContent')
            # Hover read-out, raw values: the value shown is the one the trainer logged at that step.
            hover = ('(() => { const box = document.getElementById("smooth"); box.checked = false;'
                     ' box.dispatchEvent(new Event("change")); return true; })()')
            tab.evaluate(hover)
            time.sleep(0.5)
            read = ('(() => { const card = document.querySelector("[data-chart=loss]");'
                    ' const over = card.querySelector(".u-over"); const r = over.getBoundingClientRect();'
                    ' over.dispatchEvent(new MouseEvent("mousemove", {clientX: r.right - 2, clientY: r.top + 20,'
                    ' bubbles: true})); const cells = card.querySelectorAll(".u-legend .u-value");'
                    ' return [cells[0].textContent, cells[1].textContent]; })()')
            tab.evaluate(read)
            time.sleep(0.3)
            step, value = tab.evaluate(read)
            overflow = screenshot(tab, tmp_path / "dashboard-live.png", 1400, 1000)
    finally:
        trainer.terminate()
        trainer.wait(timeout=60)
    assert re.fullmatch(r"training: step \d+ of 400 \(\d+\.\d%\)  ·  ETA \d+.*  ·  loss \S+", status), status
    assert overflow <= 0, "the page overflows at 1400 px"
    logged = {m["step"]: m["loss"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if m["type"] == "step"}
    assert abs(float(value) - logged[int(step)]) <= 1e-3 * abs(logged[int(step)]), (step, value, logged[int(step)])
    assert "parameters on cpu" in header
    print(f"dashboard screenshot: {tmp_path / 'dashboard-live.png'}")


def test_the_dashboard_shows_a_late_joiner_the_whole_run_a_stall_in_words_and_real_axes(tmp_path):
    """A page that opens after 3,000 steps (published as the trainer does, by a Run) sees step
    1 on; its loss chart has at least 4 ticks on each axis and a log scale on demand; a run
    waiting for data says so, since when and why; checkpoints and evaluations read as words.
    Screenshots at 1400 and 800 px wide are saved for a person to look at."""
    browser = chromium()
    with MetricsServer("127.0.0.1", 0) as server:
        run = Run(tmp_path, Ranks(), server, TrainConfig())
        run.publish({"type": "run", "parameters": 2_700_000, "device": "cpu", "precision": "float32", "files": 12,
                     "start_step": 0, "steps": 5000})
        for step in range(1, 3001):
            loss = 8 * math.exp(-step / 400) + 2 + 0.1 * math.sin(step)
            run.publish({"type": "step", "step": step, "loss": loss, "accuracy": 1 - loss / 10, "lr": 1e-3,
                         "tokens_per_s": 4000.0, "grad_norm": 1.0, "peak_mem_gb": 0.83, "step_time_s": 0.5,
                         "data_wait_frac": 0.01, **{f"loss_{name}": loss / 2 for name in ("text", "mel", "f0")}})
            if step % 1000 == 0:
                run.publish({"type": "eval", "step": step, "best": True, "loss": loss + 0.2, "text_acc": 0.5})
                run.publish({"type": "checkpoint", "step": step, "path": f"runs/x/ckpt-{step:08d}.pt",
                             "bytes": 33_400_000})
        run.progress.step = 3000
        run.waiting_for_data(42.0)
        run.data_message("reading b.parquet from row 120 at grpc://10.0.0.5:8815 failed: connection refused; "
                         "retry 2 of 8 in 1.0 s", "warning")
        assert wait_for(lambda: json.loads(server.history.messages()[-1])["type"] == "data")
        with browser_tab(browser, tmp_path / "profile") as tab:
            tab.call("Page.navigate", url=f"http://127.0.0.1:{server.port}/")
            card = 'document.querySelector("[data-chart=loss]").dataset'
            assert wait_for(lambda: (tab.evaluate(f"Number({card}.points || 0)") or 0) >= 2000, timeout=60)
            time.sleep(0.5)
            first, x_ticks, y_ticks = tab.evaluate(f"[{card}.firstStep, {card}.xTicks, {card}.yTicks].map(Number)")
            status = tab.evaluate('document.getElementById("status").textContent')
            detail = tab.evaluate('document.getElementById("detail").textContent')
            events = tab.evaluate('[...document.querySelectorAll("#events li span")].map(e => e.textContent)')
            wide = screenshot(tab, tmp_path / "dashboard-1400.png", 1400, 1000)
            narrow = screenshot(tab, tmp_path / "dashboard-800.png", 800, 1400)
            tab.evaluate('(() => { const box = document.getElementById("log"); box.checked = true;'
                         ' box.dispatchEvent(new Event("change")); })()')
            assert wait_for(lambda: tab.evaluate(f"{card}.scale") == "log", timeout=10)
        run.close()
    assert first == 1 and x_ticks >= 4 and y_ticks >= 4, (first, x_ticks, y_ticks)
    assert re.fullmatch(r"waiting for data since (4\d|5\d|1 min \d\d) s?.*\(after step 3000 of 5000 \(60\.0%\); ETA paused\)",
                        status), status
    assert "retry 2 of 8" in detail and "10.0.0.5:8815" in detail
    assert events[0].startswith("data: reading b.parquet") and events[1].startswith("waiting for data (since ")
    assert "checkpoint written: runs/x/ckpt-00003000.pt (33.4 MB)" in events
    assert any(e.startswith("evaluation: held-out loss") and "(best so far), masked tokens 0.5" in e for e in events)
    assert wide <= 0 and narrow <= 0, "the page overflows"
    for name in ("dashboard-1400.png", "dashboard-800.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    print(f"dashboard screenshots: {tmp_path}")


def _serves(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
