"""Peak RSS of this process, shared by every peer runner (each runs in its own venv; the script folder is on
sys.path, so this plain module imports everywhere).

Why not getrusage(RUSAGE_SELF).ru_maxrss: Linux carries ru_maxrss across fork+exec, so a runner started by a
parent that once held 1.1 GB (the benchmark driver loads the torch model to build its inputs) would report the
parent's peak. /proc/self/status VmHWM belongs to this process's own address space, which exec makes fresh."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_split_mb() -> dict[str, float]:
    """Resident memory now, by kind (/proc/self/status): anonymous (heap, arenas, KV cache) and file-backed
    (mapped model or weights-cache files, shared libraries), to attribute a peak."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    out[f"rss_{key[3:].lower()}_mb"] = round(int(rest.split()[0]) / 1024, 1)  # kB
    except OSError:
        pass
    return out
