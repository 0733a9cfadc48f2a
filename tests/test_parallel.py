"""Hardware and scale-out plumbing: this process's threads."""
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
