"""The WebSocket metrics thread: late joiners get history, stalled clients are dropped."""
import json
import socket

import pytest
from websockets.sync.client import connect

from live_metrics import MetricsServer, format_message
from util import wait_for


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


def test_the_same_port_serves_the_dashboard_page():
    import urllib.request
    with MetricsServer("127.0.0.1", 0) as server:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5) as response:
            page = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/html")
    assert "<canvas>" in page and "new WebSocket" in page and "https://" not in page   # nothing from a CDN


def test_a_token_guards_both_websocket_and_page():
    import urllib.error
    import urllib.request
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
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    with MetricsServer("127.0.0.1", 0) as server:
        server.publish({"type": "run", "parameters": 10, "device": "cpu", "precision": "float32", "files": 1,
                        "start_step": 0, "steps": 2})
        for step in (1, 2):
            server.publish({"type": "step", "step": step, "loss": 1.0 / step, "accuracy": 0.5, "lr": 1e-3,
                            "tokens_per_s": 100.0})
        assert wait_for(lambda: len(server.history) == 2)
        watcher = subprocess.Popen([sys.executable, "model_trainer.py", "watch", f"ws://127.0.0.1:{server.port}"],
                                   cwd=root, stdout=subprocess.PIPE, text=True)
        lines = [watcher.stdout.readline().strip() for _ in range(3)]
    assert watcher.wait(timeout=30) == 0   # the server closing ends the watch
    assert lines[0].startswith("run: 10 parameters on cpu")
    assert lines[1].startswith("step      1  loss 1.0000") and lines[2].startswith("step      2  loss 0.5000")
