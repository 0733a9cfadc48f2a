"""The WebSocket metrics thread: late joiners get history, stalled clients are dropped."""
import base64
import contextlib
import json
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

from live_metrics import History, MetricsServer, format_message
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


def test_the_same_port_serves_the_dashboard_page():
    with MetricsServer("127.0.0.1", 0) as server:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5) as response:
            page = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/html")
    assert "<canvas>" in page and "new WebSocket" in page and "https://" not in page   # nothing from a CDN


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


def test_the_dashboard_in_a_real_browser_draws_a_live_training_run(corpus, tmp_path):
    """Headless Chromium opens the dashboard while the trainer runs, waits until the loss chart
    holds points, and saves a screenshot (in the test's tmp folder)."""
    browser = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
    if browser is None:
        pytest.skip("no headless Chromium (Debian package 'chromium'): the dashboard browser test did not run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ws_port = s.getsockname()[1]
    trainer = subprocess.Popen(
        [sys.executable, "model_trainer.py", "--data-dir", str(corpus[0]), "--out", str(tmp_path / "run"),
         "--ws-port", str(ws_port), "--preset", "tiny", "--steps", "400", "--set", "train.checkpoint_every=400"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    screenshot = tmp_path / "dashboard.png"
    try:
        with browser_tab(browser, tmp_path / "profile") as tab:
            assert wait_for(lambda: _serves(ws_port), timeout=120), "the trainer never served its dashboard"
            tab.call("Page.navigate", url=f"http://127.0.0.1:{ws_port}/")
            points = 'Number(document.querySelector("[data-chart=loss] canvas").dataset.points || 0)'
            assert wait_for(lambda: (tab.evaluate(points) or 0) >= 5, timeout=120), "the loss chart stayed empty"
            time.sleep(0.5)   # let the next animation frame paint
            status = tab.evaluate('document.getElementById("status").textContent')
            header = tab.evaluate('document.getElementById("run").textContent')
            inked = tab.evaluate('(() => { const c = document.querySelector("[data-chart=loss] canvas");'
                                 ' const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;'
                                 ' let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; })()')
            overflow = tab.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            legend_fits = tab.evaluate('[...document.querySelectorAll(".legend")].every('
                                       'l => l.scrollWidth <= l.clientWidth)')
            # Hover read-out, raw values: the value shown is the one the trainer logged at that step.
            hover = ('(() => { document.getElementById("smooth").checked = false;'
                     ' const c = document.querySelector("[data-chart=loss] canvas"); const r = c.getBoundingClientRect();'
                     ' c.dispatchEvent(new MouseEvent("mousemove", {clientX: r.right - 9, clientY: r.top + 50,'
                     ' bubbles: true})); return document.querySelector("[data-chart=loss] .readout").textContent; })()')
            readout = tab.evaluate(hover)
            screenshot.write_bytes(base64.b64decode(tab.call("Page.captureScreenshot", format="png")["data"]))
    finally:
        trainer.terminate()
        trainer.wait(timeout=60)
    assert status.startswith("step ") and "loss" in status
    assert re.search(r"step \d+ of 400 \(\d+\.\d%\)  ·  ETA \d+", status), status   # progress and time left
    assert overflow <= 0 and legend_fits, "the page or a legend overflows at 1400 px"
    step, value = re.fullmatch(r"step (\d+)\nloss: (\S+)(?: \(step \d+\))?", readout).groups()
    logged = {m["step"]: m["loss"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if m["type"] == "step"}
    assert abs(float(value) - logged[int(step)]) <= 1e-3 * abs(logged[int(step)]), (readout, logged[int(step)])
    assert "parameters on cpu" in header
    assert inked > 500   # the loss line, axes and labels were drawn on the canvas
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    print(f"dashboard screenshot: {screenshot}")


def _serves(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
