"""How much memory building a teacher takes, and whether the machine has it free."""
from __future__ import annotations

import os

from .errors import GPDError


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, capped by a cgroup (container) limit; None if unknown."""
    found = [n for n in (_meminfo_available(), _cgroup_available(), _rlimit_available()) if n is not None]
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """cgroup v2: the limit minus what the group already uses (``max`` means no limit)."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


def _rlimit_available() -> int | None:
    """An address-space limit (``ulimit -v``) minus what this process has mapped already."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return max(0, soft - int(line.split()[1]) * 1024)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(need: int, force: bool | None, what: str = "building the teacher",
                 hint: str = "use a smaller --ratio or model") -> None:
    """Refuse a run that would not fit in free memory, unless forced: better than being killed halfway.
    ``force=None``: the command has no --force to offer."""
    free = available_bytes()
    if force or free is None or need <= free:
        return
    raise GPDError(f"{what} needs about {fmt_bytes(need)} but only {fmt_bytes(free)} is free: {hint}"
                   + (" or free memory" if force is None else ", free memory, or pass --force to try anyway"))
