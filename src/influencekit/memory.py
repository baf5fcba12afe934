"""Peak resident memory of this process, as the numbers the library prints need it."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's own peak resident set size (MiB).

    On Linux, ``VmHWM`` of ``/proc/self/status``: the high-water mark of this
    process's address space only. ``getrusage().ru_maxrss`` is not used there
    because it survives ``exec``: a Dask worker spawned by a 2 GB driver would
    report the driver's 2 GB as its own. Elsewhere ``ru_maxrss``, which macOS
    gives in bytes and other systems in KiB.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
