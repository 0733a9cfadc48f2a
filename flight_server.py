"""Arrow Flight server for the data machine: serves every Parquet file under --root.

    python flight_server.py --root DIR [--host 127.0.0.1] [--port 8815] [--batch-rows 256]
                            [--token-file F] [--tls-cert C --tls-key K]
                            [--advertise HOST:PORT] [--peer HOST:PORT ...]

Binding anything but loopback requires a bearer token (clients send `authorization: Bearer
TOKEN`); TLS is optional.

list_flights gives one FlightInfo per valid file (path relative to root, schema, rows, bytes);
get_flight_info gives one endpoint per row group; do_get streams a ticket's row groups with
RecordBatchStream over a dataset scanner, which runs in C++ without holding the GIL. Files that
fail the schema check are not served; a file's values are checked the first time it is served
(schema.validate_file), and one that fails is refused from then on. The `invalid` action and the
log name them, with file, row and column.

Several data machines: each server told of the others (--peer, repeatable) lists their files
(at most every PEER_REFRESH_S; one that did not answer, every PEER_RETRY_S) and advertises, in every endpoint of a file that a peer serves
identically (same name, rows, bytes and row groups), its own location and the peer's: any Flight
client sees the replicas and may read each endpoint from either.
"""
from __future__ import annotations

import argparse
import errno
import functools
import math
import json
import logging
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.flight as flight
import pyarrow.parquet as pq

import flight_client  # noqa: F401 (keeps gRPC's own log quiet unless asked for)
import schema
from access import read_token, require_token_beyond_loopback, token_matches
from schema import Ticket

log = logging.getLogger("flight_server")
PEER_REFRESH_S = 30.0          # a peer's listing is asked again after this long
PEER_RETRY_S = 5.0             # a peer that did not answer is asked again after this long
LOCAL_ONLY = b"local"          # list_flights criteria a peer sends: this server's files alone, no peers'

class BearerTokenAuth(flight.ServerMiddlewareFactory):
    """Every call must carry `authorization: Bearer TOKEN`; compared in constant time."""

    def __init__(self, token: str):
        super().__init__()
        self._expected = f"Bearer {token}".encode()

    def start_call(self, info, headers):
        presented = headers.get("authorization", [])   # gRPC lower-cases header names
        if not any(token_matches(value, self._expected) for value in presented):
            raise flight.FlightUnauthenticatedError("missing or wrong bearer token")
        return None


def _handler(method):
    """Clients get a typed Flight error with a short message, never a Python traceback."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except flight.FlightError:
            raise
        except Exception as err:  # noqa: BLE001 - the boundary where every failure is contained
            log.error("%s failed: %s\n%s", method.__name__, err, traceback.format_exc())
            raise flight.FlightInternalError(f"{method.__name__} failed: {type(err).__name__}") from None
    return wrapper


def _why_not_bound(host: str, port: int) -> str | None:
    """Why a server could not bind host:port, in words, or None when a plain socket can."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            return (f"port {port} on {host} is already taken (another flight_server.py?): stop that process or "
                    "choose another --port")
        if err.errno == errno.EADDRNOTAVAIL:
            return f"{host} is not an address of this machine: bind one of its own addresses (or 0.0.0.0 for all)"
        return f"cannot bind {host}:{port}: {err.strerror}"
    return None


class SampleFlightServer(flight.FlightServerBase):
    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 8815,
                 batch_rows: int = 256, token: str | None = None,
                 tls_cert: bytes | None = None, tls_key: bytes | None = None,
                 peers: list[str] = (), advertise: str | None = None, peer_tls_root_cert: bytes | None = None):
        require_token_beyond_loopback(host, token, "the data", "--token-file")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both a certificate and its key")
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"--root {root}: not a directory")
        scheme = "grpc+tls" if tls_cert else "grpc"
        try:
            super().__init__(f"{scheme}://{host}:{port}",
                             middleware={"auth": BearerTokenAuth(token)} if token else None,
                             tls_certificates=[flight.CertKeyPair(tls_cert, tls_key)] if tls_cert else None)
        except pa.ArrowException as err:   # gRPC says only "Server did not start properly"
            raise OSError(_why_not_bound(host, port) or f"cannot serve on {host}:{port}: {err}") from None
        self.scheme = scheme
        self.batch_rows = batch_rows
        self._lock = threading.Lock()
        self._catalog: dict[str, tuple[tuple, flight.FlightInfo | str]] = {}
        self._content_checked: dict[str, tuple] = {}   # name -> the (mtime, size) whose values were checked
        self._stats = {"streams": 0, "rows_streamed": 0, "bytes_streamed": 0}
        self._peers: set[str] = set()   # clients seen
        # Replicas: other servers' locations and this one's as clients should reach it.
        if peers and advertise is None and host in ("0.0.0.0", "::", ""):
            raise ValueError("with --peer, a server bound to all addresses needs --advertise HOST:PORT: the address "
                             "clients reach it at")
        self.advertised = f"{scheme}://{advertise or f'{host}:{self.port}'}"
        self._peer_locations = [f"{'grpc+tls' if tls_cert or peer_tls_root_cert else 'grpc'}://{peer}" for peer in peers]
        self._peer_options = flight.FlightCallOptions(
            headers=[(b"authorization", f"Bearer {token}".encode())] if token else [], timeout=5.0)
        self._peer_tls_root_cert = peer_tls_root_cert or tls_cert
        # peer location -> (when it was asked, its files' identities by name, or None: no answer)
        self._peer_listings: dict[str, tuple[float, dict[str, tuple] | None]] = {}
        self.refresh()

    # -- catalog ---------------------------------------------------------------------------

    def resolve(self, name: str) -> Path:
        """A client-supplied name -> a file strictly under root (no .., no absolute, no symlink out)."""
        candidate = Path(name)
        if candidate.is_absolute() or ".." in candidate.parts or not name:
            raise flight.FlightServerError(f"{name!r}: paths must be relative to the server root")
        path = (self.root / candidate).resolve()
        if not path.is_relative_to(self.root):
            raise flight.FlightServerError(f"{name!r}: resolves outside the server root")
        return path

    def _describe(self, name: str, path: Path) -> flight.FlightInfo | str:
        """FlightInfo for a valid file, or the reason it is not served."""
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as err:
            return f"not a readable Parquet file: {err}"
        arrow_schema = parquet.schema_arrow
        problems = [f"column {column}: {message}"
                    for column, message in schema.schema_problems(arrow_schema).items()]
        try:
            schema.read_metadata(arrow_schema, name)
        except ValueError as err:
            problems.append(str(err))
        if problems:
            return "; ".join(problems)
        meta = parquet.metadata
        endpoints = [flight.FlightEndpoint(Ticket(name, g, g + 1).encode(), [])
                     for g in range(meta.num_row_groups)]
        total_bytes = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        return flight.FlightInfo(arrow_schema, flight.FlightDescriptor.for_path(name), endpoints,
                                 meta.num_rows, total_bytes)

    def refresh(self) -> None:
        """Rescan root; files unchanged since the last scan keep their entry."""
        catalog = {}
        for path in sorted(self.root.rglob("*.parquet")):
            name = path.relative_to(self.root).as_posix()
            try:
                resolved = self.resolve(name)
            except flight.FlightServerError as err:
                log.warning("not serving %s: %s", name, err)
                continue
            stat = resolved.stat()
            key = (stat.st_mtime_ns, stat.st_size)
            cached = self._catalog.get(name)
            entry = cached if cached and cached[0] == key else (key, self._describe(name, resolved))
            if isinstance(entry[1], str) and entry is not cached:
                log.warning("not serving %s: %s", name, entry[1])
            catalog[name] = entry
        with self._lock:
            self._catalog = catalog

    def _info(self, name: str) -> flight.FlightInfo:
        self.resolve(name)
        self.refresh()
        entry = self._catalog.get(name)
        if entry is None:
            raise flight.FlightServerError(f"{name}: no such file under the server root")
        if not isinstance(entry[1], str) and self._content_checked.get(name) != entry[0]:
            entry = self._check_content(name, entry)
        if isinstance(entry[1], str):
            raise flight.FlightServerError(f"{name}: not served: {entry[1]}")
        return entry[1]

    def _check_content(self, name: str, entry: tuple) -> tuple:
        """The first time a file (this size and mtime) is served, every value is checked: token
        ids within the vocabulary its metadata declares, finite features, consistent lengths. A
        file that fails is refused from then on, with file, row and column named."""
        problems = schema.validate_file(self.resolve(name), source=name)   # the client's name, not our path
        with self._lock:
            if problems:
                reason = schema.summarise_problems(problems)
                log.warning("not serving %s: %s", name, reason)
                entry = (entry[0], reason)
                if self._catalog.get(name, (None,))[0] == entry[0]:
                    self._catalog[name] = entry
            self._content_checked[name] = entry[0]
        return entry

    # -- replicas on peers ---------------------------------------------------------------

    @staticmethod
    def identity(info: flight.FlightInfo) -> tuple:
        """What two servers must agree on to serve one file: rows, bytes and row groups."""
        return info.total_records, info.total_bytes, len(info.endpoints)

    def _refresh_peers(self) -> None:
        """Ask each peer for its own files (not its peers'): again after PEER_REFRESH_S, or after
        PEER_RETRY_S when it did not answer (a peer started after this server is found soon); a
        peer that does not answer serves nothing until it does."""
        for location in self._peer_locations:
            asked, files = self._peer_listings.get(location, (-math.inf, None))
            if time.monotonic() - asked < (PEER_REFRESH_S if files is not None else PEER_RETRY_S):
                continue
            try:
                client = flight.FlightClient(location, tls_root_certs=self._peer_tls_root_cert)
                files = {info.descriptor.path[0].decode(): self.identity(info)
                         for info in client.list_flights(LOCAL_ONLY, options=self._peer_options)}
                client.close()
            except (flight.FlightError, pa.ArrowException, OSError) as err:
                files = None
                log.warning("peer %s did not list its files (%s): not advertised as a replica for now", location,
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
            with self._lock:
                self._peer_listings[location] = (time.monotonic(), files)

    def _with_replicas(self, name: str, info: flight.FlightInfo) -> flight.FlightInfo:
        """The file's FlightInfo with every endpoint listing this server and each peer that serves
        the same file; a peer's file of that name but other content is named in the log."""
        if not self._peer_locations:
            return info
        self._refresh_peers()
        locations = [self.advertised]
        for location, (_, files) in list(self._peer_listings.items()):
            identity = (files or {}).get(name)
            if identity is None:
                continue
            if identity == self.identity(info):
                locations.append(location)
            else:
                log.warning("%s on peer %s differs from ours (rows, bytes, row groups %s against %s): not a replica",
                            name, location, identity, self.identity(info))
        endpoints = [flight.FlightEndpoint(endpoint.ticket, locations) for endpoint in info.endpoints]
        return flight.FlightInfo(info.schema, info.descriptor, endpoints, info.total_records, info.total_bytes)

    # -- Flight RPCs ------------------------------------------------------------------------

    @_handler
    def list_flights(self, context, criteria):
        self.refresh()
        for name, (_, info) in list(self._catalog.items()):
            if not isinstance(info, str):
                yield info if criteria == LOCAL_ONLY else self._with_replicas(name, info)

    @_handler
    def get_flight_info(self, context, descriptor):
        if descriptor.descriptor_type != flight.DescriptorType.PATH or len(descriptor.path) != 1:
            raise flight.FlightServerError("descriptor must be one file path")
        name = descriptor.path[0].decode()
        return self._with_replicas(name, self._info(name))

    @_handler
    def do_get(self, context, ticket):
        try:
            request = Ticket.decode(ticket.ticket)
        except ValueError as err:
            raise flight.FlightServerError(f"malformed ticket: {err}") from None
        info = self._info(request.file)
        n_groups = len(info.endpoints)
        if not 0 <= request.first_row_group < request.end_row_group <= n_groups:
            raise flight.FlightServerError(
                f"{request.file}: row groups [{request.first_row_group}, {request.end_row_group}) "
                f"outside [0, {n_groups})")
        if request.columns:
            unknown = set(request.columns) - set(info.schema.names)
            if unknown:
                raise flight.FlightServerError(f"{request.file}: unknown columns {sorted(unknown)}")
        fragment = next(pads.dataset(self.resolve(request.file), format="parquet").get_fragments())
        fragment = fragment.subset(row_group_ids=list(range(request.first_row_group, request.end_row_group)))
        scanner = pads.Scanner.from_fragment(fragment, schema=info.schema, batch_size=self.batch_rows,
                                             columns=list(request.columns) if request.columns else None,
                                             use_threads=False)
        with self._lock:   # counted when a stream starts, from the row groups' metadata
            self._stats["streams"] += 1
            self._stats["rows_streamed"] += sum(g.num_rows for g in fragment.row_groups)
            self._stats["bytes_streamed"] += sum(g.total_byte_size for g in fragment.row_groups)
            self._peers.add(context.peer())
        log.info("stream %s row groups [%d, %d) from row %d to %s", request.file, request.first_row_group,
                 request.end_row_group, request.skip_rows, context.peer())
        reader = scanner.to_reader()
        if request.skip_rows:   # a resumed read: Python drops the rows already delivered
            reader = pa.RecordBatchReader.from_batches(reader.schema, schema.skip_rows_of(reader, request.skip_rows))
        return flight.RecordBatchStream(reader)

    @_handler
    def list_actions(self, context):
        return [("stats", "files and rows served, invalid files, clients, streams, rows and bytes streamed"),
                ("invalid", "files not served, with the reason")]

    @_handler
    def do_action(self, context, action):
        self.refresh()
        invalid = {name: entry[1] for name, entry in self._catalog.items() if isinstance(entry[1], str)}
        if action.type == "stats":
            with self._lock:
                body = {"files": len(self._catalog) - len(invalid), "invalid_files": len(invalid),
                        "rows": sum(e[1].total_records for e in self._catalog.values()
                                    if not isinstance(e[1], str)),
                        "clients": len(self._peers), **self._stats}
        elif action.type == "invalid":
            body = invalid
        else:
            raise flight.FlightServerError(f"unknown action {action.type!r}")
        yield flight.Result(json.dumps(body).encode())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder whose Parquet files are served")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8815)
    parser.add_argument("--batch-rows", type=int, default=256, help="rows per streamed record batch")
    parser.add_argument("--token-file", help="file holding the bearer token clients must send "
                                             "(required unless --host is loopback)")
    parser.add_argument("--tls-cert", help="PEM certificate: serve over TLS (with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                        help="another data server (repeatable): its copies of our files are advertised as replicas")
    parser.add_argument("--advertise", metavar="HOST:PORT",
                        help="the address clients reach this server at (default: --host:--port)")
    parser.add_argument("--peer-tls-root-cert", help="PEM certificate to trust for TLS peers (default: --tls-cert)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        token = read_token(args.token_file) if args.token_file else None
        tls = [Path(p).read_bytes() if p else None for p in (args.tls_cert, args.tls_key, args.peer_tls_root_cert)]
        server = SampleFlightServer(args.root, args.host, args.port, args.batch_rows, token, tls[0], tls[1],
                                    peers=args.peer, advertise=args.advertise, peer_tls_root_cert=tls[2])
    except (ValueError, OSError, pa.ArrowException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    served = sum(1 for _ in server.list_flights(None, LOCAL_ONLY))
    log.info("serving %d files from %s on %s://%s:%d", served, server.root, server.scheme, args.host, server.port)
    if args.peer:
        log.info("peers %s; advertised as %s", ", ".join(args.peer), server.advertised)

    def stop(signum, frame):
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
