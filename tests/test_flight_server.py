"""The Flight server on 127.0.0.1 against direct pyarrow reads, and the dataset that reads it."""
import collections
import concurrent.futures
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

import datasets
import flight_client
import packing
import schema
from flight_client import parse_hosts
from flight_server import SampleFlightServer
from schema import Ticket
from util import self_signed_certificate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def served(corpus, tmp_path):
    """The corpus plus one file of the wrong schema and one that is not Parquet at all."""
    root, shards = corpus
    served_root = tmp_path / "root"
    shutil.copytree(root, served_root / "good")
    pq.write_table(pa.table({"sample_id": ["x"], "mel": [[1.0]]}), served_root / "wrong_schema.parquet")
    (served_root / "broken.parquet").write_bytes(b"PAR1 not really")
    (served_root / "empty.parquet").write_bytes(b"")
    server = SampleFlightServer(served_root, "127.0.0.1", 0)
    client = flight.connect(f"grpc://127.0.0.1:{server.port}")
    yield served_root, server, client
    client.close()
    server.shutdown()


def test_lists_every_valid_file_with_rows_and_schema(served):
    root, server, client = served
    infos = {i.descriptor.path[0].decode(): i for i in client.list_flights()}
    expected = sorted(p.relative_to(root).as_posix() for p in (root / "good").glob("*.parquet"))
    assert sorted(infos) == expected
    for name, info in infos.items():
        meta = pq.ParquetFile(root / name).metadata
        assert info.total_records == meta.num_rows
        assert len(info.endpoints) == meta.num_row_groups
        assert info.schema.remove_metadata().equals(schema.SAMPLE_SCHEMA)


def test_streamed_rows_equal_a_direct_read(served):
    root, server, client = served
    for info in client.list_flights():
        name = info.descriptor.path[0].decode()
        streamed = pa.Table.from_batches([chunk.data for endpoint in info.endpoints
                                          for chunk in client.do_get(endpoint.ticket)])
        assert streamed.equals(pq.read_table(root / name))


def test_a_ticket_can_select_row_groups_and_columns(served):
    root, server, client = served
    name = next(iter(client.list_flights())).descriptor.path[0].decode()
    ticket = Ticket(name, 1, 3, ("sample_id", "f0_hz")).encode()
    got = client.do_get(flight.Ticket(ticket)).read_all()
    parquet = pq.ParquetFile(root / name)
    expected = parquet.read_row_groups([1, 2], columns=["sample_id", "f0_hz"])
    assert got.equals(expected.replace_schema_metadata(got.schema.metadata))


def test_invalid_files_are_not_served_and_say_why(served):
    root, server, client = served
    invalid = json.loads(next(iter(client.do_action(flight.Action("invalid", b"")))).body.to_pybytes())
    assert set(invalid) == {"wrong_schema.parquet", "broken.parquet", "empty.parquet"}
    assert "column token_ids: missing" in invalid["wrong_schema.parquet"]
    with pytest.raises(flight.FlightServerError, match="wrong_schema.parquet: not served: .*token_ids"):
        client.get_flight_info(flight.FlightDescriptor.for_path("wrong_schema.parquet"))
    stats = json.loads(next(iter(client.do_action(flight.Action("stats", b"")))).body.to_pybytes())
    assert stats["files"] == 3 and stats["invalid_files"] == 3
    name = next(iter(client.list_flights())).descriptor.path[0].decode()
    client.do_get(flight.Ticket(Ticket(name, 0, 2).encode())).read_all()
    after = json.loads(next(iter(client.do_action(flight.Action("stats", b"")))).body.to_pybytes())
    groups = [pq.ParquetFile(root / name).metadata.row_group(g) for g in (0, 1)]
    assert after["streams"] == stats["streams"] + 1 and after["clients"] >= 1
    assert after["rows_streamed"] - stats["rows_streamed"] == sum(g.num_rows for g in groups)
    assert after["bytes_streamed"] - stats["bytes_streamed"] == sum(g.total_byte_size for g in groups)


@pytest.mark.parametrize("ticket, message", [
    (b'{"v":1,"file":"../outside.parquet","row_groups":[0,1]}', "relative to the server root"),
    (b'{"v":1,"file":"/etc/passwd","row_groups":[0,1]}', "relative to the server root"),
    (b'{"v":1,"file":"good/nope.parquet","row_groups":[0,1]}', "no such file"),
    (b'{"v":9,"file":"x","row_groups":[0,1]}', "malformed ticket: version 9"),
    (b"garbage", "malformed ticket"),
])
def test_bad_tickets_get_a_short_typed_error(served, ticket, message):
    root, server, client = served
    with pytest.raises(flight.FlightServerError, match=message) as caught:
        client.do_get(flight.Ticket(ticket)).read_all()
    assert "Traceback" not in str(caught.value)


def test_out_of_range_row_groups_and_symlinks_out_of_root_are_refused(served, tmp_path):
    root, server, client = served
    name = next(iter(client.list_flights())).descriptor.path[0].decode()
    with pytest.raises(flight.FlightServerError, match="outside"):
        client.do_get(flight.Ticket(Ticket(name, 0, 99).encode())).read_all()
    outside = tmp_path / "secret.parquet"
    shutil.copy(root / name, outside)
    (root / "link.parquet").symlink_to(outside)
    with pytest.raises(flight.FlightServerError, match="resolves outside the server root"):
        client.do_get(flight.Ticket(Ticket("link.parquet", 0, 1).encode())).read_all()
    assert "link.parquet" not in [i.descriptor.path[0].decode() for i in client.list_flights()]


def test_flight_dataset_delivers_every_sample_exactly_once(served):
    root, server, client = served
    names = [i.descriptor.path[0].decode() for i in client.list_flights()]
    dataset = datasets.ArrowFlightDataset(flight_client.Connection(("127.0.0.1",), server.port), names,
                                          packing.SequenceLayout(400, 4), batch_size=2, seed=3)
    seen = [sid for batch in dataset for sid in batch.sample_ids]
    expected = [sid for n in names for sid in pq.read_table(root / n, columns=["sample_id"]).column(0).to_pylist()]
    assert collections.Counter(seen) == collections.Counter(expected)
    # The same order as reading the files locally: one code path after the transport.
    local = datasets.LocalParquetDataset([root / n for n in names], packing.SequenceLayout(400, 4), batch_size=2, seed=3)
    assert seen == [sid for batch in local for sid in batch.sample_ids]


def test_unknown_server_or_file_is_a_clear_data_error(served):
    root, server, client = served
    dataset = datasets.ArrowFlightDataset(flight_client.Connection(("127.0.0.1",), server.port), ["good/missing.parquet"],
                                          packing.SequenceLayout(400, 4), batch_size=2)
    with pytest.raises(schema.DataError, match="good/missing.parquet: served by none of grpc://127.0.0.1:.*getting good/missing.parquet from .*no such file"):
        list(dataset)


def _names(client, options=None):
    return [i.descriptor.path[0].decode() for i in client.list_flights(options=options)]


def test_a_token_is_required_and_checked(corpus):
    root, _ = corpus
    server = SampleFlightServer(root, "127.0.0.1", 0, token="s3cret")
    try:
        client = flight.connect(f"grpc://127.0.0.1:{server.port}")
        with pytest.raises(flight.FlightUnauthenticatedError):
            _names(client)
        wrong = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer guess")])
        with pytest.raises(flight.FlightUnauthenticatedError):
            _names(client, wrong)
        right = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer s3cret")])
        assert len(_names(client, right)) == len(list(root.glob("*.parquet")))
        dataset = datasets.ArrowFlightDataset(flight_client.Connection(("127.0.0.1",), server.port, token="s3cret"), None,
                                              packing.SequenceLayout(400, 4), batch_size=4)
        assert sum(len(b.sample_ids) for b in dataset) == pq.read_table(root, columns=["sample_id"]).num_rows
        with pytest.raises(schema.DataError, match="refused the connection: no token was given"):
            datasets.ArrowFlightDataset(flight_client.Connection(("127.0.0.1",), server.port), None,
                                        packing.SequenceLayout(400, 4), 4)
    finally:
        server.shutdown()


def test_binding_beyond_loopback_needs_a_token(corpus):
    root, _ = corpus
    with pytest.raises(ValueError, match="give a bearer token"):
        SampleFlightServer(root, "0.0.0.0", 0)


def test_tls_round_trip_with_a_self_signed_certificate(corpus, tmp_path):
    root, _ = corpus
    cert, key = self_signed_certificate(tmp_path)
    server = SampleFlightServer(root, "127.0.0.1", 0, tls_cert=cert.read_bytes(), tls_key=key.read_bytes())
    try:
        dataset = datasets.ArrowFlightDataset(flight_client.Connection(("localhost",), server.port,
                                                                  tls_root_cert=cert.read_bytes()), None,
                                              packing.SequenceLayout(400, 4), batch_size=4)
        assert sum(len(b.sample_ids) for b in dataset) == pq.read_table(root, columns=["sample_id"]).num_rows
        plain = flight.connect(f"grpc://127.0.0.1:{server.port}")   # no TLS: refused
        with pytest.raises(flight.FlightUnavailableError):
            plain.wait_for_available(timeout=2)
            _names(plain)
    finally:
        server.shutdown()


def test_the_server_names_its_scheme_and_says_when_its_port_is_taken(corpus, tmp_path):
    root, _ = corpus
    cert, key = self_signed_certificate(tmp_path)
    server = subprocess.Popen([sys.executable, "flight_server.py", "--root", str(root), "--port", "0",
                               "--tls-cert", str(cert), "--tls-key", str(key)], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True)
    try:
        port = None
        for line in server.stderr:
            found = re.search(r"serving \d+ files .* on (\S+)://127\.0\.0\.1:(\d+)", line)
            if found:
                scheme, port = found.group(1), int(found.group(2))
                break
        assert port and scheme == "grpc+tls"
        second = subprocess.run([sys.executable, "flight_server.py", "--root", str(root), "--port", str(port)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"port {port} on 127.0.0.1 is already taken (another flight_server.py?)" in second.stderr
        assert "did not start properly" not in second.stderr and "add_port" not in second.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_batches_above_grpc_4mib_limit_stream(corpus, tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"sample_id": f"big/{i}", "doc_id": "big", "segment_index": i, "text": "x",
             "token_ids": np.arange(4, 10, dtype=np.int32), "mel": rng.normal(size=(6000, 80)).astype(np.float16),
             "f0_hz": np.zeros(6000, np.float32), "voicing": np.zeros(6000, np.float32),
             "energy": np.zeros(6000, np.float32), "speaker_id": 0, "sentiment": 1} for i in range(8)]
    meta = {"features": {}, "tokenizer": {"vocab_size": 260}, "speakers": {"a": 0}}
    schema.write_samples(tmp_path / "big.parquet", rows, meta, rows_per_group=8)
    server = SampleFlightServer(tmp_path, "127.0.0.1", 0, batch_rows=8)
    try:
        client = flight.connect(f"grpc://127.0.0.1:{server.port}")
        info = client.get_flight_info(flight.FlightDescriptor.for_path("big.parquet"))
        batches = [chunk.data for chunk in client.do_get(info.endpoints[0].ticket)]
        assert max(b.nbytes for b in batches) > 4 * 2**20
        assert pa.Table.from_batches(batches).equals(pq.read_table(tmp_path / "big.parquet"))
    finally:
        server.shutdown()


def test_eight_concurrent_clients_and_a_client_that_cancels(served):
    root, server, _ = served
    names = _names(flight.connect(f"grpc://127.0.0.1:{server.port}"))
    expected = {n: pq.read_table(root / n) for n in names}

    def read(name):
        client = flight.connect(f"grpc://127.0.0.1:{server.port}")
        info = client.get_flight_info(flight.FlightDescriptor.for_path(name))
        return pa.Table.from_batches([c.data for e in info.endpoints for c in client.do_get(e.ticket)])

    # A client that walks away mid-stream must not disturb the others.
    quitter = flight.connect(f"grpc://127.0.0.1:{server.port}")
    reader = quitter.do_get(next(iter(quitter.list_flights())).endpoints[0].ticket)
    reader.read_chunk()
    reader.cancel()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        work = [names[i % len(names)] for i in range(8)]
        for name, table in zip(work, pool.map(read, work, timeout=60)):
            assert table.equals(expected[name])
    assert len(_names(flight.connect(f"grpc://127.0.0.1:{server.port}"))) == len(names)   # still serving


def test_a_ticket_can_start_at_any_row(served):
    root, server, client = served
    name = next(iter(client.list_flights())).descriptor.path[0].decode()
    for skip in (0, 1, 7, 10):
        got = client.do_get(flight.Ticket(Ticket(name, 1, 3, skip_rows=skip).encode())).read_all()
        expected = pq.ParquetFile(root / name).read_row_groups([1, 2]).slice(skip)
        assert got.equals(expected.replace_schema_metadata(got.schema.metadata))


def test_a_server_killed_and_restarted_mid_epoch_loses_and_repeats_nothing(corpus):
    root, _ = corpus
    server = SampleFlightServer(root, "127.0.0.1", 0, batch_rows=2)
    port = server.port
    dataset = datasets.ArrowFlightDataset(flight_client.Connection(("127.0.0.1",), port), None, packing.SequenceLayout(300, 4), batch_size=1,
                                          seed=2, retry_backoff_s=0.2, max_retries=20)
    seen, restarted = [], []
    try:
        for i, batch in enumerate(dataset):
            seen += batch.sample_ids
            if i == 3:   # mid-epoch, mid-stream: the server goes away and comes back on the same port
                server.shutdown()
                restarted.append(SampleFlightServer(root, "127.0.0.1", port, batch_rows=2))
    finally:
        for s in [server, *restarted]:
            s.shutdown()
    assert restarted
    expected = pq.read_table(root, columns=["sample_id"]).column(0).to_pylist()
    assert collections.Counter(seen) == collections.Counter(expected)


def test_a_server_that_stays_down_is_a_clear_error_naming_it(corpus):
    root, _ = corpus
    server = SampleFlightServer(root, "127.0.0.1", 0)
    dataset = datasets.ArrowFlightDataset(flight_client.Connection(("127.0.0.1",), server.port), None, packing.SequenceLayout(300, 4),
                                          batch_size=1, retry_backoff_s=0.05, max_retries=2)
    streaming = datasets.ArrowFlightDataset(flight_client.Connection(("127.0.0.1",), server.port), None, packing.SequenceLayout(300, 4),
                                            batch_size=1, retry_backoff_s=0.05, max_retries=2)
    streaming.endpoints()   # metadata fetched while the server was up: the reads fail instead
    server.shutdown()
    with pytest.raises(schema.DataError, match=f"getting .* from grpc://127.0.0.1:{server.port} failed 3 times in a "
                                                 f"row: nothing is listening at 127.0.0.1:{server.port}"):
        list(dataset)
    with pytest.raises(schema.DataError, match=f"reading .* from row 0 at grpc://127.0.0.1:{server.port} failed 3 "
                                                 "times in a row: nothing is listening"):
        list(streaming)


class StallingServer(SampleFlightServer):
    """Stalls its first stream after one batch, as a hung disk or network would."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stalled, self.released = threading.Event(), threading.Event()

    def do_get(self, context, ticket):
        stream = super().do_get(context, ticket)
        if self.stalled.is_set():
            return stream
        self.stalled.set()
        request = Ticket.decode(ticket.ticket)
        table = pq.ParquetFile(self.root / request.file).read_row_groups(
            list(range(request.first_row_group, request.end_row_group)))
        batches = table.to_batches(max_chunksize=2)

        def slow():
            yield batches[0]
            self.released.wait(120)   # until the test ends: far longer than the read timeout
            yield from batches[1:]

        return flight.GeneratorStream(table.schema, slow())


def test_a_stalled_read_is_cancelled_and_resumed(corpus):
    root, _ = corpus
    server = StallingServer(root, "127.0.0.1", 0, batch_rows=2)
    try:
        dataset = datasets.ArrowFlightDataset(flight_client.Connection(("127.0.0.1",), server.port), None, packing.SequenceLayout(300, 4),
                                              batch_size=2, retry_backoff_s=0.05, read_timeout_s=0.5)
        seen = [sid for batch in dataset for sid in batch.sample_ids]
        assert server.stalled.is_set() and not server.released.is_set()   # did not wait out the stall
    finally:
        server.released.set()
        server.shutdown()
    expected = pq.read_table(root, columns=["sample_id"]).column(0).to_pylist()
    assert collections.Counter(seen) == collections.Counter(expected)


def test_the_data_machine_needs_no_torch(corpus, tmp_path):
    """flight_server.py as the data machine runs it, where `import torch` fails, read by a plain
    pyarrow.flight client; the validation command runs there too."""
    root, shards = corpus
    blocked = tmp_path / "no_torch"
    blocked.mkdir()
    (blocked / "torch.py").write_text("raise ImportError('torch is not installed on the data machine')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(blocked)}
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert "not installed on the data machine" in check.stderr          # the block works
    validate = subprocess.run([sys.executable, "schema.py", str(root)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    server = subprocess.Popen([sys.executable, "flight_server.py", "--root", str(root), "--port", "0"], cwd=ROOT,
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in server.stderr:   # "serving N files from ROOT on grpc://127.0.0.1:PORT"
            found = re.search(r"serving \d+ files .* on grpc://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "the server did not start"
        client = flight.connect(f"grpc://127.0.0.1:{port}")
        info = client.get_flight_info(flight.FlightDescriptor.for_path(shards[0].name))
        streamed = pa.Table.from_batches([chunk for endpoint in info.endpoints
                                          for chunk in client.do_get(endpoint.ticket).read_all().to_batches()])
        assert streamed.equals(pq.read_table(shards[0]))
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=30)



def test_bad_content_is_refused_with_file_row_and_column_while_good_files_stay_served(corpus, tmp_path):
    root, shards = corpus
    served_root = tmp_path / "root"
    shutil.copytree(root, served_root)
    table = pq.read_table(served_root / shards[0].name)
    tokens = table.column("token_ids").to_pylist()
    tokens[3][1] = 99_999                                               # beyond the 260-token vocabulary
    mel = table.column("mel").to_pylist()
    mel[5][2][7] = float("nan")
    bad = table.set_column(table.schema.get_field_index("token_ids"), "token_ids",
                           pa.array(tokens, table.schema.field("token_ids").type))
    bad = bad.set_column(bad.schema.get_field_index("mel"), "mel", pa.array(mel, table.schema.field("mel").type))
    pq.write_table(bad.replace_schema_metadata(table.schema.metadata), served_root / "bad.parquet")
    sample_ids = table.column("sample_id").to_pylist()
    server = SampleFlightServer(served_root, "127.0.0.1", 0)
    try:
        client = flight.connect(f"grpc://127.0.0.1:{server.port}")
        with pytest.raises(flight.FlightServerError) as refused:
            client.get_flight_info(flight.FlightDescriptor.for_path("bad.parquet"))
        message = str(refused.value)
        assert f"bad.parquet: row 3 (sample_id {sample_ids[3]}), column token_ids: token id outside [0, 260)" in message
        assert f"row 5 (sample_id {sample_ids[5]}), column mel: NaN or inf" in message
        names = [i.descriptor.path[0].decode() for i in client.list_flights()]
        assert "bad.parquet" not in names and len(names) == len(shards)          # the good files stay served
        invalid = json.loads(next(iter(client.do_action(flight.Action("invalid", b"")))).body.to_pybytes())
        assert "token_ids" in invalid["bad.parquet"]
        # The trainer stops at setup with the same words, before any step (no IndexError, no NaN loss).
        with pytest.raises(schema.DataError, match=r"bad\.parquet.*row 3 .*column token_ids"):
            datasets.ArrowFlightDataset(flight_client.Connection(("127.0.0.1",), server.port), ["bad.parquet"], packing.SequenceLayout(400, 4),
                                        2).metadata()
        # The local-file path applies the same checks.
        with pytest.raises(schema.DataError, match=r"bad\.parquet: 2 problem\(s\) in its content"):
            list(datasets.LocalParquetDataset([served_root / "bad.parquet"], packing.SequenceLayout(400, 4), 2))
        client.close()
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------
# Several data machines: replicas, merged listings, failover

def two_roots(corpus, tmp_path):
    """Root A holds the first two shards, root B the last two: the middle one is on both."""
    root, shards = corpus
    assert len(shards) == 3
    roots = tmp_path / "a", tmp_path / "b"
    for folder, chosen in zip(roots, (shards[:2], shards[1:])):
        folder.mkdir()
        for shard in chosen:
            shutil.copy(shard, folder / shard.name)
    return roots, shards


def test_a_server_advertises_its_peers_copies_to_a_plain_flight_client(corpus, tmp_path):
    (a, b), shards = two_roots(corpus, tmp_path)
    (b / "odd.parquet").write_bytes((a / shards[0].name).read_bytes())   # a different file under A's name...
    shutil.copy(shards[-1], b / shards[0].name)                          # ...and another under the same one
    server_b = SampleFlightServer(b, "127.0.0.1", 0)
    server_a = SampleFlightServer(a, "127.0.0.1", 0, peers=[f"127.0.0.1:{server_b.port}"])
    try:
        client = flight.connect(f"grpc://127.0.0.1:{server_a.port}")   # a generic client, not ours
        infos = {info.descriptor.path[0].decode(): info for info in client.list_flights()}
        both = [f"grpc://127.0.0.1:{server_a.port}", f"grpc://127.0.0.1:{server_b.port}"]
        for shard in shards[:2]:
            locations = [[str(loc.uri.decode() if isinstance(loc.uri, bytes) else loc.uri) for loc in e.locations]
                         for e in infos[shard.name].endpoints]
            expected = both if shard == shards[1] else both[:1]   # shards[0] differs on B: no replica
            assert locations == [expected] * len(infos[shard.name].endpoints), shard.name
        # the advertised replica serves the same rows for the same ticket
        endpoint = client.get_flight_info(flight.FlightDescriptor.for_path(shards[1].name)).endpoints[0]
        replica = flight.connect(both[1]).do_get(endpoint.ticket).read_all()
        assert replica.equals(client.do_get(endpoint.ticket).read_all())
        # our reader, told of A alone, learns of B from A's endpoints
        ours = datasets.ArrowFlightDataset(flight_client.Connection((f"127.0.0.1:{server_a.port}",)), None, packing.SequenceLayout(300, 4), 1)
        assert {e[0]: sorted(e[2]) for e in ours.endpoints()} == {shards[0].name: both[:1], shards[1].name: sorted(both)}
    finally:
        server_a.shutdown()
        server_b.shutdown()


def test_several_servers_merge_into_one_epoch_that_reads_each_replica_once(corpus, tmp_path):
    (a, b), shards = two_roots(corpus, tmp_path)
    servers = [SampleFlightServer(root, "127.0.0.1", 0) for root in (a, b)]
    try:
        dataset = datasets.ArrowFlightDataset(flight_client.Connection(tuple(f"127.0.0.1:{s.port}" for s in servers)), None,
                                              packing.SequenceLayout(300, 4), batch_size=2, seed=3)
        assert dataset.files == sorted(s.name for s in shards)
        shared = [e for e in dataset.endpoints() if len(e[2]) == 2]
        assert {e[0] for e in shared} == {shards[1].name}
        seen = [i for batch in dataset for i in batch.sample_ids]
        streamed = [json.loads(next(s.do_action(None, flight.Action("stats", b""))).body.to_pybytes())["streams"]
                    for s in servers]
    finally:
        for s in servers:
            s.shutdown()
    expected = pq.read_table(shards, columns=["sample_id"]).column(0).to_pylist()
    assert collections.Counter(seen) == collections.Counter(expected)      # one epoch: replicas read once
    endpoints = dataset.endpoints()
    preferred = collections.Counter(e[2][0] for e in endpoints)
    only = collections.Counter(e[2][0] for e in endpoints if len(e[2]) == 1)
    # each server as even a share as the replicated endpoints allow
    assert max(preferred.values()) - min(preferred.values()) <= max(1, abs(only[dataset.locations[0]]
                                                                           - only[dataset.locations[1]]) - len(shared))
    assert min(streamed) > 0


@pytest.mark.parametrize("resume", [False, True])
def test_a_server_dying_mid_epoch_fails_over_to_the_replica_from_the_first_undelivered_row(corpus, tmp_path, resume,
                                                                                         caplog):
    """A holds shards 0-1, B holds all of them: A is shut down mid-epoch, mid-stream. The epoch
    still reads every sample once, the rest from B, and says it fails over, to where; a run
    resumed from a position recorded after the failure continues exactly."""
    root, shards = corpus
    a = tmp_path / "a"
    a.mkdir()
    for shard in shards[:2]:
        shutil.copy(shard, a / shard.name)
    server_a, server_b = SampleFlightServer(a, "127.0.0.1", 0, batch_rows=2), SampleFlightServer(root, "127.0.0.1", 0)
    hosts = [f"127.0.0.1:{server_a.port}", f"127.0.0.1:{server_b.port}"]

    def dataset(hosts=hosts):
        return datasets.ArrowFlightDataset(flight_client.Connection(tuple(hosts)), None, packing.SequenceLayout(300, 4), batch_size=1, seed=2,
                                           retry_backoff_s=0.05, max_retries=4, shuffle_window=2)

    first = dataset()
    reference = [i for batch in dataset() for i in batch.sample_ids]   # both up
    seen = []
    try:
        for index, batch in enumerate(first):
            seen += batch.sample_ids
            first.record(batch)
            if index == 3:
                server_a.shutdown()
            if resume and index == 8:
                break
        if resume:
            with pytest.raises(schema.DataError, match="leave it out of --flight-host"):
                dataset()   # A is still down: its files cannot be listed
            resumed = dataset(hosts[1:])
            resumed.load_state_dict(first.state_dict())
            seen += [i for batch in resumed for i in batch.sample_ids]
    finally:
        server_a.shutdown()
        server_b.shutdown()
    expected = pq.read_table(shards, columns=["sample_id"]).column(0).to_pylist()
    assert collections.Counter(seen) == collections.Counter(expected)
    assert seen == reference                         # the same order as without the failure
    said = [r.getMessage() for r in caplog.records if r.name == "mmtrain.data"]
    assert resume or any(f"at grpc://{hosts[0]}" in m and f"failing over to grpc://{hosts[1]} (retry 1 of 4)" in m for m in said), said


def test_a_file_without_replica_on_a_dead_server_is_an_error_naming_host_and_file(corpus, tmp_path):
    (a, b), shards = two_roots(corpus, tmp_path)
    servers = [SampleFlightServer(root, "127.0.0.1", 0) for root in (a, b)]
    dataset = datasets.ArrowFlightDataset(flight_client.Connection(tuple(f"127.0.0.1:{s.port}" for s in servers)), None,
                                          packing.SequenceLayout(300, 4), batch_size=1, retry_backoff_s=0.01,
                                          max_retries=2, shuffle=False)
    dataset.endpoints()
    servers[0].shutdown()
    try:
        with pytest.raises(schema.DataError, match=f"reading {shards[0].name} from row 0 at "
                                                     f"grpc://127.0.0.1:{servers[0].port} failed 3 times in a row"):
            list(dataset)
    finally:
        servers[1].shutdown()


def test_flight_hosts_parse_with_and_without_ports():
    assert parse_hosts(["a:9000", "b", "[::1]:7", "::1"], 8815) == [("a", 9000), ("b", 8815), ("::1", 7),
                                                                             ("::1", 8815)]
    with pytest.raises(ValueError, match="--flight-host 'a:x'"):
        parse_hosts(["a:x"], 8815)


def test_a_peer_that_starts_later_is_advertised_once_it_answers(corpus, tmp_path, monkeypatch):
    import flight_server
    monkeypatch.setattr(flight_server, "PEER_RETRY_S", 0.0)   # ask a silent peer again at once
    root, shards = corpus
    server_b = SampleFlightServer(root, "127.0.0.1", 0)
    port_b = server_b.port
    server_b.shutdown()                                        # B is not up yet when A first lists
    server_a = SampleFlightServer(root, "127.0.0.1", 0, peers=[f"127.0.0.1:{port_b}"])
    client = flight.connect(f"grpc://127.0.0.1:{server_a.port}")
    try:
        def locations():
            info = client.get_flight_info(flight.FlightDescriptor.for_path(shards[0].name))
            return {loc.uri.decode() if isinstance(loc.uri, bytes) else str(loc.uri) for loc in info.endpoints[0].locations}

        assert locations() == {f"grpc://127.0.0.1:{server_a.port}"}
        server_b = SampleFlightServer(root, "127.0.0.1", port_b)
        assert locations() == {f"grpc://127.0.0.1:{server_a.port}", f"grpc://127.0.0.1:{port_b}"}
    finally:
        server_a.shutdown()
        server_b.shutdown()
