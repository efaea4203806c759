"""Notifications: a short (name, message) note to a peer, queued there until it asks."""

from __future__ import annotations

import pytest

from moonlet import EngineConfig, TransferEngine, TransferError
from moonlet.errors import MoonletError


def test_notes_arrive_in_order_and_are_taken_once():
    with TransferEngine() as a, TransferEngine() as b:
        for i in range(5):
            a.notify(b.name, f"kv-{i}", "ready ✓")
        assert b.notifications() == [(f"kv-{i}", "ready ✓") for i in range(5)]
        assert b.notifications() == []


def test_bad_notes_and_unreachable_peers_raise():
    with TransferEngine() as a, TransferEngine() as b:
        with pytest.raises(TransferError, match="at most"):
            a.notify(b.name, "x", "y" * 40000)
        seg = a.open_segment(b.name)
    with pytest.raises(TransferError, match="not delivered"):
        with TransferEngine() as c:
            c.notify(seg, "x", "y")  # b is closed


def test_notes_need_the_cluster_secret():
    secret = "notification secret 0123456789"
    with TransferEngine(config=EngineConfig(secret=secret)) as b:
        with TransferEngine(config=EngineConfig(secret=secret)) as a:
            a.notify(b.name, "ok", "1")
        with TransferEngine(config=EngineConfig(secret="another secret 0123456789")) as stranger:
            with pytest.raises(MoonletError, match="failed to prove it holds the cluster secret"):
                stranger.notify(b.name, "forged", "2")
        assert b.notifications() == [("ok", "1")]
