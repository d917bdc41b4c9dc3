"""Process memory and I/O counters from /proc (Linux), shared by the CPU benchmarks."""

from __future__ import annotations

STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def status_bytes(fields=STATUS_FIELDS) -> dict[str, int]:
    """Fields of /proc/self/status in bytes (VmHWM is the peak RSS, file pages included)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0]) * 1024
    return out


def read_bytes() -> int:
    """Bytes this process has read from storage (/proc/self/io ``read_bytes``; 0 if unavailable)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
