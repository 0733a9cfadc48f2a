"""Connection failures at start-up: each explained with its fix, at once when no retry can mend it."""
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import datasets
import flight_client
import packing
import schema
from flight_client import Connection
from flight_server import SampleFlightServer
from util import self_signed_certificate
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def servers(corpus, tmp_path_factory):
    """A TLS server, a plain server with a token, the TLS server's certificate and another one."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(folder, "server")
    other, _ = self_signed_certificate(folder, "other")
    root, _ = corpus
    tls = SampleFlightServer(root, "127.0.0.1", 0, tls_cert=cert.read_bytes(), tls_key=key.read_bytes())
    plain = SampleFlightServer(root, "127.0.0.1", 0, token="s3cret")
    yield tls, plain, cert, other
    tls.shutdown()
    plain.shutdown()


def _open(connection):
    return datasets.ArrowFlightDataset(connection, None, packing.SequenceLayout(400, 4), 4, retry_backoff_s=0.01)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_start_up_failure_names_its_cause_and_fix_without_retries(servers, caplog):
    tls, plain, cert, other = servers
    cases = [
        (Connection(("localhost",), tls.port, tls_root_cert=other.read_bytes(), tls_root_cert_file=str(other)),
         rf"certificate is not trusted by {other} \(certificate verify failed: self-signed certificate\); give the "
         r"certificate the server was started with"),
        (Connection(("127.0.0.1",), tls.port), f"127.0.0.1:{tls.port} speaks TLS: give its certificate"),
        (Connection(("localhost",), plain.port, token="s3cret", tls_root_cert=cert.read_bytes()),
         f"localhost:{plain.port} does not speak TLS: leave out --flight-tls-root-cert"),
        (Connection(("127.0.0.1",), plain.port, token="guess", token_file="guess.txt"),
         "refused the connection: the token in guess.txt is not the server's"),
        (Connection(("127.0.0.1",), plain.port), "refused the connection: no token was given"),
        (Connection(("no-such-host.invalid",), 8815), "cannot resolve the host name in no-such-host.invalid:8815"),
    ]
    for connection, message in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mmtrain.data"):
            with pytest.raises(schema.DataError, match=message):
                _open(connection)
        assert not [r for r in caplog.records if "retry" in r.getMessage()], message   # not retried like an outage


def test_nothing_listening_is_said_after_a_few_quick_tries(caplog):
    port = _free_port()
    with caplog.at_level(logging.WARNING, logger="mmtrain.data"):
        with pytest.raises(schema.DataError, match=f"failed 3 times in a row: nothing is listening at "
                                                     rf"127.0.0.1:{port}: is flight_server.py running there, and "
                                                     r"with this --port\?"):
            _open(Connection(("127.0.0.1",), port))
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == flight_client.STARTUP_RETRIES < 8   # the start-up budget, not the run's


def test_trainer_against_a_tls_server_without_its_certificate(servers, tmp_path):
    """Through the command line, as a user meets it: one line with the fix, no gRPC log lines."""
    tls, _, cert, _ = servers
    result = subprocess.run([sys.executable, str(ROOT / "model_trainer.py"), "--flight-host", f"127.0.0.1:{tls.port}",
                             "--preset", "tiny", "--out", str(tmp_path / "run"), "--ws-port", "-1"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{tls.port} speaks TLS: give its certificate" in result.stderr
    assert "ssl_transport_security" not in result.stderr and "absl" not in result.stderr   # gRPC's own log is quiet
