"""Where the CPUs go while a benchmark runs: per process and per thread of every process whose command line
holds PATTERN, CPU % (user + system) over each INTERVAL, for SECONDS.

    python3 scripts/cpu-sample.py PATTERN SECONDS [INTERVAL]      (Linux /proc; prints one block per interval)

Threads are named by their id. A thread at 100 % is one CPU busy; a process's threads summing to far less
than their count while the benchmark is slow point at waiting (locks, the GIL, wake-ups).
"""

from __future__ import annotations

import os
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def _ticks(path: str) -> int | None:
    try:
        with open(path) as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def _snapshot(pattern: str) -> dict[str, tuple[str, int, dict[str, int]]]:
    """pid -> (role, process ticks, tid -> ticks) for the processes matching ``pattern``
    (those, and threads, that ended while being read are left out)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        line = b" ".join(argv).decode(errors="replace")
        ticks = _ticks(f"/proc/{pid}/stat")
        if pattern not in line or "cpu-sample" in line or ticks is None:
            continue
        role = " ".join(a.decode(errors="replace") for a in argv[2:4]) or line[:40]
        threads = {}
        for tid in tids:
            t = _ticks(f"/proc/{pid}/task/{tid}/stat")
            if t is not None:
                threads[tid] = t
        out[pid] = (role, ticks, threads)
    return out


def main() -> int:
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    pattern, seconds = sys.argv[1], float(sys.argv[2])
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    if not pattern or seconds <= 0 or interval <= 0:
        raise SystemExit("PATTERN must be non-empty, SECONDS and INTERVAL positive")
    end = time.monotonic() + seconds
    before, t0 = _snapshot(pattern), time.monotonic()
    while time.monotonic() < end:
        time.sleep(interval)
        after, t1 = _snapshot(pattern), time.monotonic()
        scale = 100.0 / (HZ * (t1 - t0))
        print(f"--- t={time.strftime('%H:%M:%S')} over {t1 - t0:.2f} s")
        for pid, (role, ticks, threads) in sorted(after.items()):
            if pid not in before:
                continue
            old = before[pid][2]
            # a thread started since the last sample counts from zero
            per = sorted(((round((t - old.get(tid, 0)) * scale), tid) for tid, t in threads.items()
                          if t > old.get(tid, 0)), reverse=True)
            print(f"{pid:>7} {role:<28} {(ticks - before[pid][1]) * scale:6.0f} %  threads (id=%): "
                  + " ".join(f"{tid}={p}" for p, tid in per[:20]))
        sys.stdout.flush()
        before, t0 = after, t1
    return 0


if __name__ == "__main__":
    sys.exit(main())
