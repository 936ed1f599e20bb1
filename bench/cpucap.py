"""
CPU caps for benchmark processes: each capped process in a cgroup of its
own whose CPU quota is a fraction of one core.

Why: a machine where every core is already busy cannot show what one more
free core gives a second worker process. Capping each worker at, say, 0.35
of a core makes the workers the scarce resource while the database and the
load generator keep the rest of the machine: "a small core each, with room
to spare around them" stands in for "a free core each".

cgroup v1 (a ``cgroup`` mount with the ``cpu`` controller:
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) is used when it is mounted,
otherwise cgroup v2 (a ``cgroup2`` mount offering ``cpu``: ``cpu.max``).
The groups are made next to the cgroup this process is in (v1) or at the
root of the v2 mount (v2 forbids enabling a controller below a group that
holds processes), named ``hookah-bench-<this pid>-<sequence>-<label>``, and removed by
``remove_all``: the processes still in them are moved back to the parent
first. Groups left by a benchmark that was killed (its pid gone) are
removed when the next one starts. On v2 the ``cpu`` controller, once
enabled for the root's children, is left enabled.

Not a package: imported as a sibling module, like ``benchlib``.
"""

from __future__ import annotations

import errno
import os
import re
import time
from typing import Dict, List, Optional, Tuple

PREFIX = "hookah-bench-"
STALE = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")


class CgroupUnavailable(SystemExit):
    """No cgroup CPU controller can be written here: the benchmark stops with one line."""


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _mounts() -> List[Tuple[str, str, List[str]]]:
    """(mount point, file system type, options) of every cgroup mount."""
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
                found.append((fields[1].replace("\\040", " "), fields[2], fields[3].split(",")))
    return found


def _own_path(v1_controller: Optional[str]) -> str:
    """This process's cgroup path in the v1 hierarchy holding ``v1_controller``, or in v2 (None)."""
    for line in _read("/proc/self/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        if v1_controller is None and controllers == "":
            return path
        if v1_controller is not None and v1_controller in controllers.split(","):
            return path
    return "/"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Group:
    """One cgroup with a CPU quota."""

    def __init__(self, caps: CpuCaps, label: str) -> None:
        self.caps = caps
        self.label = label
        caps.made += 1
        self.name = f"{PREFIX}{os.getpid()}-{caps.made}-{label}"
        self.path = os.path.join(caps.parent, self.name)
        # The path as /proc/<pid>/cgroup shows it.
        self.cgroup_path = os.path.join(caps.parent_cgroup_path, self.name)
        os.mkdir(self.path)
        try:
            quota = max(1000, round(caps.cores * caps.period_us))
            if caps.version == 1:
                _write(os.path.join(self.path, "cpu.cfs_period_us"), str(caps.period_us))
                _write(os.path.join(self.path, "cpu.cfs_quota_us"), str(quota))
            else:
                _write(os.path.join(self.path, "cpu.max"), f"{quota} {caps.period_us}")
        except OSError:
            os.rmdir(self.path)
            raise

    def add(self, pid: int) -> None:
        """Move the process (all its threads) into this group."""
        _write(os.path.join(self.path, "cgroup.procs"), str(pid))

    def pids(self) -> List[int]:
        try:
            return [int(p) for p in _read(os.path.join(self.path, "cgroup.procs")).split()]
        except FileNotFoundError:
            return []

    def holds(self, pid: int) -> Tuple[int, int]:
        """(threads of ``pid`` in this group, threads of ``pid``): every one of them must be here."""
        inside = total = 0
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return 0, 0
        for task in tasks:
            try:
                text = _read(f"/proc/{pid}/task/{task}/cgroup")
            except OSError:
                continue
            total += 1
            for line in text.splitlines():
                _, controllers, path = line.split(":", 2)
                mine = controllers == "" if self.caps.version == 2 else "cpu" in controllers.split(",")
                if mine and path == self.cgroup_path:
                    inside += 1
                    break
        return inside, total

    def stat(self) -> Dict[str, float]:
        """Scheduler periods, throttled periods and throttled seconds so far (``cpu.stat``)."""
        values: Dict[str, float] = {}
        for line in _read(os.path.join(self.path, "cpu.stat")).splitlines():
            key, _, value = line.partition(" ")
            values[key] = float(value)
        throttled = values.get("throttled_time", 0.0) / 1e9 if self.caps.version == 1 else values.get("throttled_usec", 0.0) / 1e6
        return {"periods": values.get("nr_periods", 0.0), "throttled": values.get("nr_throttled", 0.0), "throttled_s": throttled}

    def remove(self) -> None:
        _remove(self.path, self.caps.parent)


def _remove(path: str, parent: str) -> None:
    """Move what is left in the group ``path`` to ``parent``, then remove it."""
    for _ in range(50):
        try:
            pids = _read(os.path.join(path, "cgroup.procs")).split()
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                _write(os.path.join(parent, "cgroup.procs"), pid)
            except OSError:
                pass  # it ended meanwhile
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.02)  # a process forked into it meanwhile: move it too
    os.rmdir(path)


class CpuCaps:
    """Makes capped groups (``group``) and removes them all (``remove_all``)."""

    def __init__(self, cores: float, period_us: int = 100_000) -> None:
        if not 0 < cores:
            raise CgroupUnavailable(f"--cpu-cap must be a positive number of cores, not {cores}")
        if not 1000 <= period_us <= 1_000_000:
            raise CgroupUnavailable(f"the cgroup CPU period must be 1 ms to 1 s, not {period_us} µs")
        self.cores = cores
        self.period_us = period_us
        self.groups: List[Group] = []
        self.made = 0  # groups made so far: each name is new
        self.version, self.parent, self.parent_cgroup_path = self._hierarchy()
        self._remove_stale()
        # One probe: a group can be made and given a quota (root, writable mount).
        try:
            self.group("probe").remove()
        except OSError as e:
            raise CgroupUnavailable(f"cannot make a capped cgroup under {self.parent} (cgroup v{self.version}): {e}")
        self.groups.clear()

    def describe(self) -> str:
        return (f"each capped at {self.cores:g} core (cgroup v{self.version}, quota {round(self.cores * self.period_us)} µs "
                f"per {self.period_us} µs, under {self.parent})")

    def _hierarchy(self) -> Tuple[int, str, str]:
        """(cgroup version, directory to make groups in, that directory's cgroup path)."""
        mounts = _mounts()
        for point, kind, options in mounts:
            if kind == "cgroup" and "cpu" in options:
                own = _own_path("cpu")
                parent = os.path.normpath(os.path.join(point, own.lstrip("/")))
                if os.access(parent, os.W_OK):
                    return 1, parent, own
        v2_points = [point for point, kind, _ in mounts if kind == "cgroup2"]
        for point in v2_points:
            try:
                offered = _read(os.path.join(point, "cgroup.controllers")).split()
            except OSError:
                continue
            if "cpu" not in offered:
                continue
            try:
                if "cpu" not in _read(os.path.join(point, "cgroup.subtree_control")).split():
                    _write(os.path.join(point, "cgroup.subtree_control"), "+cpu")
            except OSError as e:
                raise CgroupUnavailable(f"cannot enable the cpu controller in {point} (cgroup v2): {e}")
            return 2, point, "/"
        mounted = ", ".join(f"{point} ({kind})" for point, kind, _ in mounts) or "none"
        raise CgroupUnavailable(
            "--cpu-cap needs a writable cgroup CPU controller (a v1 cgroup mount with cpu, or a v2 cgroup2 "
            f"mount offering cpu), and there is none here; cgroup mounts: {mounted}"
        )

    def _remove_stale(self) -> None:
        try:
            names = os.listdir(self.parent)
        except OSError:
            return
        for name in names:
            match = STALE.match(name)
            if match and not _pid_alive(int(match.group(1))):
                try:
                    _remove(os.path.join(self.parent, name), self.parent)
                except OSError:
                    pass

    def group(self, label: str) -> Group:
        g = Group(self, label)
        self.groups.append(g)
        return g

    def remove_all(self) -> List[str]:
        """Remove every group made here; returns the failures (one line each)."""
        failures = []
        for g in reversed(self.groups):
            try:
                g.remove()
            except OSError as e:
                failures.append(f"could not remove cgroup {g.path}: {e}")
        self.groups.clear()
        return failures


def children(pid: int) -> List[int]:
    """The direct children of ``pid`` (Linux /proc)."""
    found: List[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(child) for child in f.read().split())
    except OSError:
        pass
    return found


class CappedTree:
    """
    A server's capped processes: its first process in a group of its own as
    soon as it has started (``cap_root``), and each of its children, as they
    appear, in a group of their own (``poll``).

    A child is forked into its parent's group, so from its first instruction
    it is held to the parent's quota (shared with its siblings until ``poll``
    moves it): never more than the cap. With ``children_serve`` the children
    are the serving processes (a ``--workers`` master's workers), otherwise
    the first process is.
    """

    def __init__(self, caps: CpuCaps, label: str, children_serve: bool) -> None:
        self.caps = caps
        self.label = label
        self.children_serve = children_serve
        self.root = 0
        self.root_group: Optional[Group] = None
        self.child_groups: Dict[int, Group] = {}

    def cap_root(self, pid: int) -> None:
        self.root = pid
        self.root_group = self.caps.group(f"{self.label}-main")
        self.root_group.add(pid)

    def poll(self) -> int:
        """Put new children in groups of their own; returns how many serving processes are capped alone."""
        for child in children(self.root):
            if child not in self.child_groups:
                group = self.caps.group(f"{self.label}-{child}")
                try:
                    group.add(child)
                except ProcessLookupError:
                    continue  # it ended already
                self.child_groups[child] = group
        if not self.children_serve:
            return 1 if self.root_group is not None else 0
        return sum(1 for pid in self.child_groups if _pid_alive(pid))

    def serving(self) -> List[Tuple[int, Group]]:
        """(pid, group) of each serving process capped so far."""
        if not self.children_serve:
            assert self.root_group is not None
            return [(self.root, self.root_group)]
        return sorted(self.child_groups.items())
