"""Chrome-trace events and the overlap statistics of the data-parallel step."""
import json
import os
import threading
import time


class Tracer:
    """Collects spans (perf_counter seconds) and writes them as a Chrome trace (JSON)."""

    def __init__(self, path, rank=0):
        self.path = path
        self.rank = rank
        self.events = []
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    @property
    def enabled(self):
        return self.path is not None

    def span(self, name, t_start, t_end, track="compute", **args):
        if not self.enabled:
            return
        ev = {"name": name, "ph": "X", "pid": self.rank, "tid": track, "ts": (t_start - self._t0) * 1e6,
              "dur": max(0.0, (t_end - t_start) * 1e6), "args": args}
        with self._lock:
            self.events.append(ev)

    def instant(self, name, t, track="compute", **args):
        if not self.enabled:
            return
        ev = {"name": name, "ph": "i", "s": "t", "pid": self.rank, "tid": track, "ts": (t - self._t0) * 1e6,
              "args": args}
        with self._lock:
            self.events.append(ev)

    def write(self):
        if not self.enabled:
            return None
        with self._lock:
            events = list(self.events)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        os.replace(tmp, self.path)
        return self.path


class CommStats:
    """Communication time, exposed (not hidden behind backward) time and overlap fraction."""

    def __init__(self):
        self.comm_s = 0.0
        self.exposed_s = 0.0
        self.windows = 0
        self.collectives = 0
        self.bytes = 0

    def count(self, wire):
        """One collective over `wire` was issued."""
        self.collectives += 1
        self.bytes += wire.numel() * wire.element_size()

    def as_dict(self):
        frac = 1.0 - self.exposed_s / self.comm_s if self.comm_s > 0 else 1.0
        return {"comm_s": self.comm_s, "exposed_comm_s": self.exposed_s, "overlap_fraction": max(0.0, frac),
                "windows": self.windows, "collectives": self.collectives, "comm_bytes": self.bytes}
