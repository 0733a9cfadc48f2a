"""Live training metrics over WebSocket, and a terminal client that watches them.

The trainer publishes JSON messages ({"type": "step" | "eval" | "checkpoint" | "finished" |
"failed" | "run", ...}); a background thread running its own asyncio loop fans them out. The
trainer never waits on a client: every client has a bounded queue, and one that falls behind
is dropped. A client that connects late first receives the run info and the recent history.

    python live_metrics.py ws://127.0.0.1:8765      # print one line per update
"""
from __future__ import annotations

import asyncio
import collections
import json
import sys
import threading

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

CLIENT_QUEUE = 256
HISTORY = 2000


class MetricsServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 8765):
        self.host, self.requested_port = host, port
        self.port: int | None = None
        self.run_info: dict = {"type": "run"}
        self.history: collections.deque[str] = collections.deque(maxlen=HISTORY)
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
        async with serve(self._client, self.host, self.requested_port) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
            for queue in self._clients:   # end every handler so the server closes at once
                queue.put_nowait(None)

    async def _client(self, connection):
        queue: asyncio.Queue = asyncio.Queue()   # bounded by _fan_out, so a None always fits
        for message in [json.dumps(self.run_info), *list(self.history)[-(CLIENT_QUEUE - 2):]]:
            queue.put_nowait(message)
        self._clients.add(queue)
        try:
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
        text = json.dumps(message)
        if message.get("type") == "run":
            self.run_info = message
        else:
            self.history.append(text)
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


def format_message(message: dict) -> str:
    kind = message.get("type", "?")
    if kind == "run":
        return (f"run: {message.get('parameters', 0):,} parameters on {message.get('device')} "
                f"({message.get('precision')}), {message.get('files')} files, "
                f"steps {message.get('start_step')}..{message.get('steps')}")
    if kind == "step":
        return (f"step {message['step']:>6}  loss {message['loss']:.4f}  acc {message['accuracy']:.3f}  "
                f"lr {message['lr']:.2e}  {message['tokens_per_s']:.0f} tok/s")
    return f"{kind}: " + " ".join(f"{k}={v}" for k, v in message.items() if k != "type")


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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(watch(sys.argv[1]))
