"""Reaching the data machines: the flags every command shares, Flight failures explained, and
the servers read as one (replicas, retries, failover).

Torch-free (the data server uses it for its peers). A failure at start-up is explained in
words with its fix (certificate not trusted, TLS on one side only, nothing listening, a name
that does not resolve, a wrong token) and, when no retry can mend it, raised at once instead of
being retried like an outage.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.flight as flight

from access import read_token
from schema import DataError, Ticket

# gRPC's own log lines (handshake traces) reach the terminal only when asked for: GRPC_VERBOSITY=INFO.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

RETRYABLE = (flight.FlightUnavailableError, flight.FlightTimedOutError, flight.FlightCancelledError)
PROBE_TIMEOUT_S = 5.0   # the TLS probe after a closed connection
STARTUP_TIMEOUT_S = 15.0   # the first calls to a server: no answer in this long is an error
STARTUP_RETRIES = 2        # at start-up, a server not (yet) listening is asked this many times more
log = logging.getLogger("mmtrain.data")


def add_arguments(parser: argparse.ArgumentParser, hosts_group=None) -> None:
    """--flight-host, --port, --flight-token-file, --flight-tls-root-cert: one set of flags for
    training and for predict/embed/evaluate."""
    (hosts_group or parser).add_argument(
        "--flight-host", nargs="+", metavar="HOST[:PORT]",
        help="Flight server(s) on the data machines: several are merged, files on more than one are read "
             "once as replicas")
    parser.add_argument("--port", type=int, default=8815, help="Flight server port (where --flight-host names none)")
    parser.add_argument("--flight-token-file", help="file holding the server's bearer token")
    parser.add_argument("--flight-tls-root-cert", help="PEM certificate to trust (the server's --tls-cert): connect "
                                                       "over TLS")


@dataclass(frozen=True)
class Connection:
    """How to reach the data servers; the file names are kept for messages."""
    hosts: tuple[str, ...]
    port: int = 8815
    token: str | None = None
    tls_root_cert: bytes | None = None
    token_file: str | None = None
    tls_root_cert_file: str | None = None

    @classmethod
    def from_args(cls, args) -> "Connection":
        hosts = args.flight_host
        cert_file = args.flight_tls_root_cert
        try:
            cert = Path(cert_file).read_bytes() if cert_file else None
        except OSError as err:
            raise ValueError(f"--flight-tls-root-cert {cert_file}: {err.strerror or err}") from None
        if cert is not None and b"BEGIN CERTIFICATE" not in cert:
            raise ValueError(f"--flight-tls-root-cert {cert_file}: not a PEM certificate (no BEGIN CERTIFICATE line)")
        try:
            token = read_token(args.flight_token_file) if args.flight_token_file else None
        except OSError as err:
            raise ValueError(f"--flight-token-file {args.flight_token_file}: {err.strerror or err}") from None
        return cls(tuple([hosts] if isinstance(hosts, str) else hosts), args.port, token, cert,
                   args.flight_token_file, cert_file)

    @property
    def locations(self) -> list[str]:
        scheme = "grpc+tls" if self.tls_root_cert else "grpc"
        return [f"{scheme}://{h if ':' not in h else f'[{h}]'}:{p}" for h, p in parse_hosts(list(self.hosts), self.port)]

    def client(self, location: str) -> flight.FlightClient:
        return flight.FlightClient(location, tls_root_certs=self.tls_root_cert)

    def options(self, timeout: float) -> flight.FlightCallOptions:
        headers = [(b"authorization", f"Bearer {self.token}".encode())] if self.token else []
        return flight.FlightCallOptions(headers=headers, timeout=timeout)

    def explain(self, location: str, err: Exception) -> tuple[str, bool]:
        """-> (what went wrong and how to fix it, whether a retry could mend it)."""
        text = str(err)
        address = location.split("://", 1)[-1]
        detail = _grpc_reason(text)
        if isinstance(err, flight.FlightUnauthenticatedError):
            given = (f"the token in {self.token_file} is not the server's" if self.token
                     else "no token was given")
            return (f"{address} refused the connection: {given}; give the server's token file (its --token-file) "
                    "with --flight-token-file", False)
        if "certificate verify failed" in text or "CERTIFICATE_VERIFY_FAILED" in text:
            return (f"{address}: the server's certificate is not trusted by {self.tls_root_cert_file} ({detail}); "
                    "give the certificate the server was started with (its --tls-cert) to --flight-tls-root-cert",
                    False)
        if "not in peer certificate" in text or "hostname" in text.lower() and "mismatch" in text.lower():
            return (f"{address}: the server's certificate does not name this host ({detail}); connect by a name "
                    "the certificate lists (its subjectAltName)", False)
        if "wrong version number" in text or "WRONG_VERSION_NUMBER" in text:
            return (f"{address} does not speak TLS: leave out --flight-tls-root-cert, or start flight_server.py "
                    "there with --tls-cert and --tls-key", False)
        if "Connection refused" in text:
            return (f"nothing is listening at {address}: is flight_server.py running there, and with this --port?",
                    True)
        if "errors resolving" in text or "Domain name not found" in text or "lookup failed" in text:
            return f"cannot resolve the host name in {address}: check --flight-host ({detail})", False
        if "Socket closed" in text and not self.tls_root_cert and self._speaks_tls(location):
            return (f"{address} speaks TLS: give its certificate (the server's --tls-cert) with "
                    "--flight-tls-root-cert", False)
        if isinstance(err, flight.FlightTimedOutError) or "Deadline Exceeded" in text:
            return f"{address} did not answer in time ({detail}): is a firewall dropping the port?", True
        if isinstance(err, RETRYABLE):
            return f"{address}: {detail}", True
        return f"{address}: {text}", False   # the server's own words (file, row, column)

    def _speaks_tls(self, location: str) -> bool:
        """Whether the server completes a TLS handshake (its certificate unchecked: only to say
        that TLS is what it wants)."""
        address = location.split("://", 1)[-1]
        client = flight.FlightClient(f"grpc+tls://{address}", disable_server_verification=True)
        try:
            list(client.list_flights(options=self.options(PROBE_TIMEOUT_S)))
            return True
        except flight.FlightUnauthenticatedError:
            return True
        except flight.FlightError as err:
            return "handshake" not in str(err).lower() and "Socket closed" not in str(err)
        finally:
            client.close()


class Servers:
    """The data servers as one: their listings merged, a file listed by more than one (same name,
    rows, bytes and row groups), or advertised by a server in its endpoints' locations, is one
    file with replicas and is read once. Each endpoint prefers the replica that has been given the
    fewest endpoints so far, so every server serves a balanced share. A read that fails goes on
    from the first row not yet delivered at the next replica, and at the same one (after a
    backoff) when there is no other. Failures no retry can mend (a certificate, a token, TLS on
    one side only) stop at once, in words."""

    DOWN_FOR_S = 30.0   # a server that failed is tried last for this long

    def __init__(self, connection: Connection, max_retries: int = 8, retry_backoff_s: float = 0.5,
                 read_timeout_s: float = 120.0):
        self.connection = connection
        self.max_retries, self.retry_backoff_s, self.read_timeout_s = max_retries, retry_backoff_s, read_timeout_s
        self.locations = connection.locations
        self.location = ", ".join(self.locations)   # for messages
        self._clients: dict[str, flight.FlightClient] = {}
        self._down_until: dict[str, float] = {}
        self._catalog = None

    def __getstate__(self):
        # gRPC clients are not fork-safe: each DataLoader worker makes its own.
        return {**self.__dict__, "_clients": {}, "_catalog": None}   # neither pickles; a worker fetches its own

    def client(self, location: str):
        if location not in self._clients:
            self._clients[location] = self.connection.client(location)
        return self._clients[location]

    @property
    def _options(self):
        """Every call carries the token and is cancelled after read_timeout_s (then retried)."""
        return self.connection.options(self.read_timeout_s)

    def failed(self, location: str, failures: int, what: str, err: Exception, backoff: bool = True,
                retries: int | None = None, next_location: str | None = None) -> None:
        """After a failure: raise at once when no retry can mend it, or once there were more than
        `retries` (default max_retries) in a row; else say so (and where the next try goes, when
        it fails over to another replica) and (with `backoff`) wait."""
        reason, retryable = self.connection.explain(location, err)
        retries = self.max_retries if retries is None else retries
        if not retryable:
            raise DataError(f"{what} failed: {reason}") from err
        if failures > retries:
            raise DataError(f"{what} failed {failures} times in a row: {reason}") from err
        wait = min(self.retry_backoff_s * 2 ** (failures - 1), 30.0) if backoff else 0.0
        if next_location and next_location != location:
            log.warning("%s failed: %s; failing over to %s (retry %d of %d)", what, reason, next_location, failures,
                        retries)
        else:
            log.warning("%s failed: %s; retry %d of %d in %.1f s", what, reason, failures, retries, wait)
        time.sleep(wait)
        self._clients.pop(location, None)   # reconnect
        self._down_until[location] = time.monotonic() + self.DOWN_FOR_S

    def _startup_call(self, location: str, what: str, call):
        """A call made while the run starts: answered within STARTUP_TIMEOUT_S, and a server not
        listening is asked only STARTUP_RETRIES more times, so a wrong address fails in seconds."""
        options = self.connection.options(min(self.read_timeout_s, STARTUP_TIMEOUT_S))
        failures = 0
        while True:
            try:
                return call(self.client(location), options)
            except flight.FlightError as err:
                failures += 1
                self.failed(location, failures, what, err, retries=min(STARTUP_RETRIES, self.max_retries))

    def served_files(self) -> list[str]:
        """Every file some server lists, sorted."""
        files = set()
        for location in self.locations:
            try:
                files |= {info.descriptor.path[0].decode() for info in self._startup_call(
                    location, f"listing the files of {location}",
                    lambda client, options: list(client.list_flights(options=options)))}
            except DataError as err:
                if len(self.locations) == 1:
                    raise
                raise DataError(f"{err} (to train on the other servers' files alone, leave it out of "
                                "--flight-host)") from err
        files = sorted(files)
        if not files:
            raise DataError(f"{self.location} serve no valid Parquet files")
        return files

    def _describe(self, location: str, name: str):
        """The server's FlightInfo for a file, or why it does not serve it."""
        try:
            return self._startup_call(location, f"getting {name} from {location}", lambda client, options:
                                      client.get_flight_info(flight.FlightDescriptor.for_path(name), options))
        except DataError as err:
            if "no such file" in str(err):
                return str(err)
            raise

    def catalog(self, files: list[str]) -> dict[str, tuple[flight.FlightInfo, list[str]]]:
        """file -> (its FlightInfo, every location that serves it), replicas checked alike."""
        if self._catalog is None:
            catalog = {}
            for name in files:
                answers = {location: self._describe(location, name) for location in self.locations}
                infos = {location: info for location, info in answers.items() if not isinstance(info, str)}
                if not infos:
                    raise DataError(f"{name}: served by none of {self.location}: " + "; ".join(answers.values()))
                (first, info), *others = infos.items()
                shape = (info.total_records, info.total_bytes, len(info.endpoints))
                for location, other in others:
                    if (other.total_records, other.total_bytes, len(other.endpoints)) != shape:
                        raise DataError(f"{name} differs between {first} ({info.total_records} rows, "
                                        f"{len(info.endpoints)} row groups) and {location} ({other.total_records} rows, "
                                        f"{len(other.endpoints)} row groups): serve one file under one name")
                advertised = [loc.uri.decode() if isinstance(loc.uri, bytes) else str(loc.uri)
                              for other in infos.values() for endpoint in other.endpoints for loc in endpoint.locations]
                catalog[name] = (info, list(dict.fromkeys([*infos, *advertised])))
            self._catalog = catalog
        return self._catalog

    def endpoints(self, files: list[str]) -> list[tuple[str, bytes, tuple[str, ...]]]:
        """(file, ticket, locations: the preferred one first) of every endpoint of `files`. Endpoints with one location count
        first; each replicated endpoint then prefers the location given the fewest so far (all
        ranks compute the same)."""
        catalog = self.catalog(files)
        load = collections.Counter(locations[0] for info, locations in catalog.values() if len(locations) == 1
                                   for _ in info.endpoints)
        endpoints = []
        for name, (info, locations) in catalog.items():
            for endpoint in info.endpoints:
                preferred = min(locations, key=lambda location: (load[location], locations.index(location)))
                if len(locations) > 1:
                    load[preferred] += 1
                endpoints.append((name, endpoint.ticket.ticket,
                                  (preferred, *(location for location in locations if location != preferred))))
        return endpoints

    def _by_health(self, locations: tuple[str, ...]) -> list[str]:
        """The endpoint's locations, those that failed lately last."""
        now = time.monotonic()
        return sorted(locations, key=lambda location: self._down_until.get(location, 0.0) > now)

    def read_endpoint(self, endpoint, skip_rows: int = 0, columns: tuple[str, ...] | None = None):
        """Stream one endpoint. A lost connection or a read past `read_timeout_s` goes on from the
        first row not yet delivered at the endpoint's next location; once every location failed
        in turn, after a backoff; `max_retries` failures in a row are an error."""
        name, raw, locations = endpoint
        ticket, delivered, failures = Ticket.decode(raw), skip_rows, 0
        order = self._by_health(locations)
        options = self._options
        while True:
            location = order[failures % len(order)]
            try:
                request = replace(ticket, skip_rows=delivered, columns=columns or ticket.columns)
                reader = self.client(location).do_get(flight.Ticket(request.encode()), options)
                for chunk in reader:
                    delivered += chunk.data.num_rows
                    failures = 0
                    yield chunk.data
                return
            except flight.FlightError as err:
                failures += 1
                where = f" (replicas: {', '.join(order)})" if len(order) > 1 else ""
                self.failed(location, failures, f"reading {name} from row {delivered} at {location}{where}", err,
                            backoff=failures % len(order) == 0, next_location=order[failures % len(order)])


def _grpc_reason(text: str) -> str:
    """The last, telling part of a gRPC error text."""
    line = text.splitlines()[0] if text else ""
    for marker in ("SSL routines::", "last error: ", "with message: "):
        if marker in line:
            line = line.rsplit(marker, 1)[1]
            break
    return line.strip() or "no reason given"


def parse_hosts(hosts: str | list[str], port: int) -> list[tuple[str, int]]:
    """["a:8815", "b", "[::1]:9000"] -> [(host, port)], `port` where an entry names none."""
    parsed = []
    for entry in [hosts] if isinstance(hosts, str) else hosts:
        host, sep, entry_port = entry.rpartition(":") if not entry.endswith("]") else ("", "", "")
        if not sep or (host.count(":") and not host.startswith("[")):   # no port, or a bare IPv6 address
            host, entry_port = entry, str(port)
        if not entry_port.isdigit() or not host:
            raise ValueError(f"--flight-host {entry!r}: use HOST or HOST:PORT")
        parsed.append((host.strip("[]"), int(entry_port)))
    return parsed
