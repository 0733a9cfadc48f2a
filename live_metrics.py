"""Live training metrics over WebSocket, and a terminal client that watches them.

The same port serves the dashboard page (dashboard.html: live charts, drawn with the uPlot
library vendored under vendor/uplot/, served from here: the page works offline) to a browser at
http://HOST:PORT/. Binding anything but loopback requires a token, given by clients as
`?token=...` in the URL (browsers cannot set WebSocket headers) or an `Authorization: Bearer`
header.

The trainer publishes JSON messages ({"type": "step" | "eval" | "checkpoint" | "status" |
"data" | "rebalance" | "finished" | "failed" | "run", ...}); a background thread running its
own asyncio loop fans them out. The trainer never waits on a client: every client has a bounded
queue, and one that falls behind is dropped. A client that connects late (or again) first
receives the run info and the whole run so far: every event, and the steps exact for the most
recent ones and thinned beyond (`History`), one JSON message each.

    python live_metrics.py ws://127.0.0.1:8765      # print one line per update
"""
from __future__ import annotations

import asyncio
import http
import json
import math
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from access import require_token_beyond_loopback, token_matches

CLIENT_QUEUE = 256
DASHBOARD = Path(__file__).resolve().parent / "dashboard.html"
VENDOR = Path(__file__).resolve().parent / "vendor"
STATIC = {"/uPlot.iife.min.js": ("uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
          "/uPlot.min.css": ("uplot/uPlot.min.css", "text/css; charset=utf-8")}


class History:
    """The run so far, for a client that connects late: every event and, of the steps, the
    `recent` newest and those since the last thinning exactly, the older ones at a stride that
    doubles as the run grows (`older` / 2 to `older` of them after a thinning, evenly spaced,
    step 1 always among them: a long run's curve keeps its shape)."""

    def __init__(self, recent: int = 2000, older: int = 2000):
        self.recent, self.older, self.stride = recent, older, 1
        self._messages: list[tuple[int | None, str]] = []   # (the step's ordinal, or None for an event; JSON)
        self._steps = self._ordinal = 0

    def add(self, text: str, is_step: bool) -> None:
        if is_step:
            self._ordinal += 1
            self._steps += 1
        self._messages.append((self._ordinal if is_step else None, text))
        if self._steps > self.recent + 2 * self.older:   # amortised: a thinning every `older` steps at most
            self._thin()

    def _thin(self) -> None:
        newest_old = self._ordinal - self.recent
        older = [o for o, _ in self._messages if o is not None and o <= newest_old]
        while sum((o - 1) % self.stride == 0 for o in older) > self.older:
            self.stride *= 2
        self._messages = [(o, text) for o, text in self._messages
                          if o is None or o > newest_old or (o - 1) % self.stride == 0]
        self._steps = sum(o is not None for o, _ in self._messages)

    def __len__(self) -> int:
        return len(self._messages)

    def messages(self) -> list[str]:
        return [text for _, text in self._messages]


class MetricsServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 8765, token: str | None = None):
        require_token_beyond_loopback(host, token, "the training metrics", "--ws-token-file")
        self.host, self.requested_port, self.token = host, port, token
        self._pages = {"/": (DASHBOARD.read_bytes(), "text/html; charset=utf-8")}
        self._pages["/dashboard"] = self._pages["/"]
        self._pages.update({path: ((VENDOR / name).read_bytes(), kind) for path, (name, kind) in STATIC.items()})
        self.port: int | None = None
        self.run_info: dict | None = None
        self.history = History()
        self._clients: set[asyncio.Queue] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="metrics-ws", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise OSError(f"cannot serve metrics on ws://{self.host}:{self.requested_port}: {self._error}")
        return self

    def _run(self):
        try:
            asyncio.run(self._serve())
        except BaseException as err:  # noqa: BLE001 - reported to start()
            self._error = err
            self._ready.set()

    async def _serve(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._client, self.host, self.requested_port, process_request=self._route) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
            for queue in self._clients:   # end every handler so the server closes at once
                queue.put_nowait(None)

    def _authorised(self, request) -> bool:
        if self.token is None:
            return True
        query = parse_qs(request.path.partition("?")[2])
        presented = query.get("token", [""])[0] or request.headers.get("Authorization", "").removeprefix("Bearer ")
        return token_matches(presented, self.token)

    def _route(self, connection, request):
        """Plain HTTP GET / gets the dashboard; WebSocket upgrades go on to the handshake."""
        path = request.path.partition("?")[0]
        if not self._authorised(request) and path not in STATIC:   # the chart library is no secret
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        page = self._pages.get(path)
        if page is not None:
            body, kind = page
            response = connection.respond(http.HTTPStatus.OK, "")
            for name, value in (("Content-Type", kind), ("Content-Length", str(len(body)))):
                del response.headers[name]   # websockets' Headers add to, not replace, a value
                response.headers[name] = value
            response.body = body
            return response
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")

    async def _client(self, connection):
        queue: asyncio.Queue = asyncio.Queue()   # bounded by _fan_out, so a None always fits
        # What happened so far, taken with the queue's registration in one go (no await between
        # them on this loop), so the live feed follows it without a gap or a repeat.
        known = [json.dumps(self.run_info)] if self.run_info else []   # none before the run describes itself
        past = [*known, *self.history.messages()]
        self._clients.add(queue)
        try:
            for message in past:
                await connection.send(message)
            while True:
                message = await queue.get()
                if message is None:   # fell behind, or the server is closing
                    break
                await connection.send(message)
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(queue)

    def _fan_out(self, message: dict):
        # Runs on the loop's thread, the only one that touches history and the client queues.
        words = in_words(message)
        text = json.dumps({**message, "words": words} if words else message)
        if message.get("type") == "run":
            self.run_info = message
        else:
            self.history.add(text, message.get("type") == "step")
        for queue in list(self._clients):
            if queue.qsize() >= CLIENT_QUEUE:
                self._clients.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(text)

    def publish(self, message: dict) -> None:
        """Thread-safe and non-blocking."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fan_out, dict(message))

    def __enter__(self) -> "MetricsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=5)


def json_ready(values: dict) -> dict:
    """NaN and infinities as null: strict JSON, which every client parses."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def format_message(message: dict) -> str:
    kind = message.get("type", "?")
    if kind == "run":
        return (f"run: {message.get('parameters', 0):,} parameters on {message.get('device')} "
                f"({message.get('precision')}), {message.get('files')} files, "
                f"steps {message.get('start_step')}..{message.get('steps')}")
    if kind == "step":
        def number(name, spec):   # null: a skipped (non-finite) step, or a value not measured
            value = message.get(name)
            return "-" if value is None else format(value, spec)
        return (f"step {message['step']:>6}  loss {number('loss', '.4f')}  acc {number('accuracy', '.3f')}  "
                f"lr {number('lr', '.2e')}  {number('tokens_per_s', '.0f')} tok/s"
                + ("  skipped (non-finite loss or gradient)" if message.get("skipped") else ""))
    words = in_words(message)
    if words:
        return words if kind == "finished" else f"step {message.get('step')}: {words}"
    return f"{kind}: " + " ".join(f"{k}={v}" for k, v in message.items() if k not in ("type", "time", "words"))


def in_words(m: dict) -> str | None:
    """An event as a person reads it (the dashboard's events panel, `watch`), or None for a
    message that is no event (a step's metrics, a passing status)."""
    kind = m.get("type")
    if kind == "status":
        if m.get("state") != "waiting for data":
            return None
        return "waiting for data" + (f" (since {time.strftime('%H:%M:%S', time.localtime(m['since']))})"
                                     if m.get("since") else "")
    if kind == "step":
        return "skipped: a non-finite loss or gradient (the weights untouched)" if m.get("skipped") else None
    if kind == "rebalance":
        speeds = ", ".join(f"{v:,.0f}" for v in m.get("positions_per_s_by_process", []))
        return (f"work re-balanced from epoch {m['from_epoch']}: batches {m['batches_per_step_by_process']} of "
                f"{m['batch_size_by_process']} sequences per process (measured {speeds} positions/s)")
    if kind == "data":
        return "data: " + m["message"]
    if kind == "checkpoint":
        size = f" ({m['bytes'] / 1e6:.1f} MB)" if m.get("bytes") else ""
        return f"checkpoint written: {m['path']}{size}"
    if kind == "checkpoint_failed":
        return f"checkpoint not written: {m['error']}"
    if kind == "eval":
        scores = "".join(f", {name} {m[key]:.3f}" for key, name in (("text_acc", "masked tokens"),
                                                                    ("speaker_acc", "speaker"),
                                                                    ("sentiment_acc", "sentiment"))
                         if isinstance(m.get(key), (int, float)))
        return f"evaluation: held-out loss {m['loss']:.4f}" + (" (best so far)" if m.get("best") else "") + scores
    if kind == "finished":
        if m.get("steps") and m["step"] < m["steps"]:
            return f"stopped at step {m['step']} of {m['steps']} (asked to stop)"
        return f"finished at step {m['step']}" + (f"; last checkpoint {m['checkpoint']}" if m.get("checkpoint") else "")
    if kind == "failed":
        return f"failed: {m['error']}"
    return None


def watch(url: str) -> int:
    from websockets.sync.client import connect
    try:
        with connect(url) as ws:
            for raw in ws:
                print(format_message(json.loads(raw)), flush=True)
    except (OSError, ConnectionClosed) as err:
        print(f"{url}: {err}", file=sys.stderr)
        return 1
    return 0


def watch_main(argv: list[str], prog: str = "live_metrics.py") -> int:
    """The `watch` command line: one line per update of a training run's live metrics."""
    import argparse
    parser = argparse.ArgumentParser(prog=prog, description="Print one line per live update of a training run "
                                     "(its first line describes the run).")
    parser.add_argument("url", help="the run's metrics address, e.g. ws://127.0.0.1:8765 (add /?token=... when the "
                                    "trainer was given --ws-token-file)")
    return watch(parser.parse_args(argv).url)


if __name__ == "__main__":
    sys.exit(watch_main(sys.argv[1:]))
