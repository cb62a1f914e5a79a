"""Machine details and background-load measurement shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform

import jax
import numpy as np

import jaxcfl

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None


def loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as fh:
            return [float(x) for x in fh.read().split()[:3]]
    except (OSError, ValueError):
        return None


def machine_info() -> dict:
    """CPU model, core count, platform and library versions, load average at start."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "jaxcfl": jaxcfl.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "loadavg_at_start": loadavg(),
    }


class OtherLoad:
    """Fraction of all CPUs used by *other* processes between ``start`` and ``stop``.

    Busy time of the whole machine (/proc/stat) minus this process's own CPU time.
    """

    def __init__(self):
        try:
            self.tick = os.sysconf("SC_CLK_TCK")
        except (ValueError, OSError, AttributeError):
            self.tick = 100
        self._s = None

    def _snap(self):
        with open("/proc/stat") as fh:
            vals = [int(x) for x in fh.readline().split()[1:9]]
        t = os.times()
        return sum(vals), sum(vals) - vals[3] - vals[4], (t.user + t.system) * self.tick

    def start(self) -> "OtherLoad":
        try:
            self._s = self._snap()
        except (OSError, ValueError):
            self._s = None
        return self

    def stop(self) -> float | None:
        if self._s is None:
            return None
        try:
            tot, busy, own = self._snap()
        except (OSError, ValueError):
            return None
        t0, b0, o0 = self._s
        return max(0.0, ((busy - b0) - (own - o0)) / max(tot - t0, 1))
