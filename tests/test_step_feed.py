"""The step feed: batches read ahead, in order, errors passed on, a stream that stops."""
import threading

import pytest

import schema
from step_feed import Prefetch
from util import wait_for


def test_prefetch_keeps_order_and_passes_errors_on():
    assert list(Prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise schema.DataError("server gone")

    got = []
    with pytest.raises(schema.DataError, match="server gone"):
        for item in Prefetch(failing(), depth=2):
            got.append(item)
    assert got == [1]
    stream = Prefetch(iter(range(10**6)), depth=2)
    assert next(stream) == 0
    stream.close()   # abandoning the stream stops the producer thread
    assert wait_for(lambda: not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate()))
