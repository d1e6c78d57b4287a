"""Small helpers for fanout.py and run.py (standard library only)."""

from __future__ import annotations

import datetime as dt
import math
import os
import sys

CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list; q in [0, 100]."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _read_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, CPU seconds) of a process, or None if it is gone.

    CPU is utime + stime plus cutime + cstime: the time of children that already
    exited and were reaped (a PostgreSQL backend that closed), which a live
    child's own entry no longer shows.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = raw[raw.rfind(b")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return ppid, (utime + stime + cutime + cstime) / CLK_TCK


def _tree(root_pids: list[int]) -> tuple[set[int], dict[int, float]]:
    """The given processes and all their descendants, and every process's CPU seconds."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read_stat(int(entry))
        if stat is not None:
            parents[int(entry)], cpu[int(entry)] = stat
    wanted = set(root_pids) & set(parents)
    changed = True
    while changed:  # close the set under "child of"
        changed = False
        for pid, ppid in parents.items():
            if ppid in wanted and pid not in wanted:
                wanted.add(pid)
                changed = True
    return wanted, cpu


def process_tree_cpu(root_pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by the given processes and all their descendants."""
    wanted, cpu = _tree(root_pids)
    return sum(cpu.get(pid, 0.0) for pid in wanted)


def process_tree_rss_kib(root_pids: list[int]) -> int:
    """Resident memory (VmRSS, KiB) of the given processes and all their descendants."""
    total = 0
    for pid in _tree(root_pids)[0]:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def parse_cpu_specs(specs: list[str]) -> dict[str, list[int]]:
    """["server=12", "backend=34,56"] -> {"server": [12], "backend": [34, 56]}."""
    groups: dict[str, list[int]] = {}
    for spec in specs:
        name, _, pids = spec.partition("=")
        if not name or not pids:
            raise ValueError(f"--cpu wants NAME=PID[,PID...], got {spec!r}")
        groups.setdefault(name, []).extend(int(p) for p in pids.split(",") if p)
    return groups


def cpu_snapshot(groups: dict[str, list[int]]) -> dict[str, float]:
    return {name: process_tree_cpu(pids) for name, pids in groups.items()}


if __name__ == "__main__":
    # `python3 benchlib.py cpu NAME=PID[,PID] ...` prints {"NAME": cpu_seconds, ...} as JSON,
    # for shell scripts that take CPU snapshots around a run.
    import json
    import sys

    if len(sys.argv) < 2 or sys.argv[1] != "cpu":
        sys.exit("usage: benchlib.py cpu NAME=PID[,PID...] ...")
    print(json.dumps(cpu_snapshot(parse_cpu_specs(sys.argv[2:]))))


def machine_line() -> str:
    """When and where a benchmark ran, for the first line of its output."""
    return (
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, Python "
        f"{sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}"
    )
