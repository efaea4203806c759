"""The pinned staging arena's allocator (runs without a GPU: pinning then just fails and is logged)."""

from __future__ import annotations

import random

from moonlet.gpu import StagingPool


def test_arena_hands_out_disjoint_stretches_and_merges_them_back():
    pool = StagingPool(1 << 20)
    rng = random.Random(1)
    held = []
    for _ in range(3000):
        if held and rng.random() < 0.5:
            held.pop(rng.randrange(len(held))).release()
        else:
            stage = pool.take([(0, rng.randrange(1, 200_000), 0)])
            if stage._pool is not None:  # from the arena: must not overlap anything still held
                lo, hi = stage.addr, stage.addr + stage.view.nbytes
                for other in held:
                    if other._pool is not None:
                        assert hi <= other.addr or other.addr + other.view.nbytes <= lo
            held.append(stage)
    for stage in held:
        stage.release()
    assert pool._free == [(0, 1 << 20)]
    big = pool.take([(0, 2 << 20, 0)])  # larger than the arena: a temporary buffer instead
    assert big._pool is None and big.view.nbytes == 2 << 20
    pool.close()
