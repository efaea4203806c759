"""Batch bookkeeping without any transport: the uniform fast path and its move to per-request state."""

from __future__ import annotations

import threading
import time

import pytest

from moonlet.batch import Batch, State


def test_uniform_batch_completed_by_one_reply():
    b = Batch(3, time.monotonic() + 5)
    b.add_parts_all("tcp")
    assert not b.done
    assert [s.state for s in b.statuses()] == [State.PENDING] * 3
    assert b.status(-1).state is State.PENDING and b.status(2).transport == "tcp"
    b.parts_completed(range(3))
    assert b.done
    assert [(s.state, s.transport) for s in b.wait()] == [(State.COMPLETED, "tcp")] * 3
    with pytest.raises(IndexError):
        b.status(3)


def test_uniform_batch_partly_completed_then_failed():
    b = Batch(4, time.monotonic() + 5)
    b.add_parts_all("tcp")
    b.parts_completed(range(2))  # a first frame of two
    assert not b.done
    assert [s.state for s in b.statuses()] == [State.COMPLETED, State.COMPLETED, State.PENDING, State.PENDING]
    b.part_done(2, State.FAILED, "refused")
    b.parts_completed([3])
    statuses = b.wait()
    assert [s.state for s in statuses] == [State.COMPLETED, State.COMPLETED, State.FAILED, State.COMPLETED]
    assert statuses[2].reason == "refused" and statuses[2].transport == "tcp"


def test_moved_requests_and_slices():
    b = Batch(2, time.monotonic() + 5)
    b.add_parts([(0, 2), (1, 1)], "rdma")  # request 0 in two slices
    b.set_transport([1], "tcp")
    b.part_done(0)
    b.part_done(1)
    assert not b.done and b.status(0).state is State.PENDING
    b.part_done(0)
    assert [(s.state, s.transport) for s in b.wait()] == [(State.COMPLETED, "rdma"), (State.COMPLETED, "tcp")]


def test_add_parts_all_refused_after_parts():
    b = Batch(1, time.monotonic() + 5)
    b.add_parts([(0, 1)], "tcp")
    with pytest.raises(RuntimeError):
        b.add_parts_all("tcp")


def test_empty_batch_is_done():
    assert Batch(0, time.monotonic() + 5).wait() == []


def test_waiter_without_a_driver_sees_another_thread_complete_the_batch():
    b = Batch(1, time.monotonic() + 5)
    b.add_parts_all("tcp")
    threading.Timer(0.05, b.parts_completed, args=([0],)).start()
    assert b.wait()[0].state is State.COMPLETED and b.done
