"""Hardware and scale-out plumbing: this process's threads and host memory, DDP's gradient buckets."""
import pytest
import torch

import parallel


def test_cpu_threads_one_per_process_under_torchrun_and_a_warning_when_the_machine_is_busy(monkeypatch):
    before = torch.get_num_threads()
    cpu = torch.device("cpu")
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(parallel.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        torch.set_num_threads(2)
        assert parallel.set_cpu_threads(0, cpu, parallel.Ranks()) == (2, None)               # alone: torch's default
        assert parallel.set_cpu_threads(0, cpu, parallel.Ranks(1, 2, 1)) == (1, None)        # torchrun on CPU: one each
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert parallel.set_cpu_threads(0, cpu, parallel.Ranks(1, 2, 1)) == (2, None)        # the user's choice holds
        monkeypatch.setattr(parallel.os, "getloadavg", lambda: (3.0 * (parallel.os.cpu_count() or 1), 0.0, 0.0))
        threads, warning = parallel.set_cpu_threads(2, cpu, parallel.Ranks())
        assert threads == 2 and "exceeds its" in warning and "train.cpu_threads=1" in warning
        assert parallel.set_cpu_threads(1, cpu, parallel.Ranks()) == (1, None)               # one thread: nothing to say
    finally:
        torch.set_num_threads(before)


def _bucket_order(rank: int, port: int, out: str) -> None:
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    ranks = parallel.init_distributed("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])   # 8 MiB
    x = torch.randn(2, 512)
    replica = parallel.distribute(model, "ddp", ranks, torch.device("cpu"),
                                  first_backward=lambda module: module(x).sum().backward())
    assert all(p.grad is None for p in model.parameters())   # the fixing pass leaves nothing behind
    for _ in range(2):
        replica(torch.randn(2, 512) * (rank + 1)).sum().backward()
    if rank == 0:
        with open(out, "w") as f:
            f.write(replica._get_ddp_logging_data().get("rebuilt_per_bucket_param_indices", ""))
    torch.distributed.destroy_process_group()


def test_ddp_buckets_follow_the_backward_pass_so_exchanges_overlap_it(tmp_path):
    """DDP launches bucket exchanges in bucket order: the first bucket must hold the last layers,
    whose gradients the backward pass produces first."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "buckets.txt"
    mp.spawn(_bucket_order, args=(port, str(out)), nprocs=2)
    buckets = [[int(i) for i in bucket.split()] for bucket in out.read_text().split(",")]
    assert len(buckets) >= 2   # DDP's first bucket is small (1 MiB), the others 25 MiB
    flat = [i for bucket in buckets for i in bucket]
    assert flat == sorted(flat, reverse=True) == list(range(15, -1, -1))   # last layer first, every parameter once


REUSE_PROBE = """
import ctypes, json, torch, parallel
class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo
def held():   # bytes in the heap, bytes mapped one allocation each
    info = libc.mallinfo2()
    return info.arena, info.hblkhd
def allocate():
    before = held()
    tensor = torch.ones(16 << 20)   # 64 MB
    return tensor, [a - b for a, b in zip(held(), before)]
seen = {}
tensor, seen["default"] = allocate()
del tensor
seen["applied"] = parallel.reuse_host_memory()
seen["reusing"] = []
for _ in range(12):
    tensor, grown = allocate()
    seen["reusing"].append(grown)
    del tensor
print(json.dumps(seen))
"""


def test_reused_host_memory_serves_large_tensors_from_the_heap_and_keeps_them():
    """In a fresh process (the setting is the process's): by default a 64 MB tensor is mapped on
    its own (glibc); after reuse_host_memory each comes from the heap, which stops growing once
    freed tensors' memory is taken again (a freed chunk can fall a few bytes short of the next
    aligned request until it merges with a neighbour: the heap grew for up to 6 of 12 tensors).
    glibc's allocator: elsewhere reuse_host_memory is a no-op."""
    import json
    import platform
    import subprocess
    import sys
    from pathlib import Path
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("reuse_host_memory tunes glibc's allocator; this Python runs on another libc")
    probe = subprocess.run([sys.executable, "-c", REUSE_PROBE], capture_output=True, text=True, timeout=300,
                           cwd=Path(parallel.__file__).parent)
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    size = 64 << 20
    assert seen["default"][1] >= size                                       # mapped on its own
    assert seen["applied"] is True
    assert all(mapped < 0.1 * size for _, mapped in seen["reusing"])        # from the heap
    assert seen["reusing"][0][0] >= 0.9 * size                              # which grew for the first
    assert all(heap == 0 for heap, _ in seen["reusing"][-4:])               # and then stopped growing
    assert sum(heap for heap, _ in seen["reusing"]) <= 8 * size
