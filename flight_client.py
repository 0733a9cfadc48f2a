"""Reaching the data machines: the flags every command shares, and Flight failures explained.

Torch-free (the data server uses it for its peers). A failure at start-up is explained in
words with its fix (certificate not trusted, TLS on one side only, nothing listening, a name
that does not resolve, a wrong token) and, when no retry can mend it, raised at once instead of
being retried like an outage.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.flight as flight

from access import read_token

# gRPC's own log lines (handshake traces) reach the terminal only when asked for: GRPC_VERBOSITY=INFO.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

RETRYABLE = (flight.FlightUnavailableError, flight.FlightTimedOutError, flight.FlightCancelledError)
PROBE_TIMEOUT_S = 5.0   # the TLS probe after a closed connection


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
