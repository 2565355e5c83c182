"""Prometheus text-format metrics, written by hand (three families, no dependency).

- `vlmkit_requests_total{endpoint, status}`: answered requests;
- `vlmkit_request_seconds{endpoint}`: a latency histogram;
- `vlmkit_batch_size{model, kind}`: how many requests each model call served (batching at work).
Endpoint labels are route paths (unknown paths count as "other"), so a scan of random URLs cannot
grow the label set.
"""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    """Cumulative-bucket histogram with sum and count, as Prometheus exposes it."""

    def __init__(self, buckets: tuple) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
        out += [f"{name}_sum{{{labels}}} {self.sum:.6f}", f"{name}_count{{{labels}}} {self.count}"]
        return out


class Metrics:
    """The server's counters; `render()` is the body of GET /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # batch sizes are recorded from the event loop, requests too; cheap insurance
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batches: dict[tuple[str, str], Histogram] = {}

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, model: str, kind: str, size: int) -> None:
        with self._lock:
            self.batches.setdefault((model, kind), Histogram(BATCH_BUCKETS)).observe(size)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP vlmkit_requests_total Requests answered, by endpoint and HTTP status.",
                     "# TYPE vlmkit_requests_total counter"]
            lines += [f'vlmkit_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP vlmkit_request_seconds Time from a request's arrival to its response.",
                      "# TYPE vlmkit_request_seconds histogram"]
            for endpoint, histogram in sorted(self.latency.items()):
                lines += histogram.lines("vlmkit_request_seconds", f'endpoint="{endpoint}"')
            lines += ["# HELP vlmkit_batch_size Requests served by one model call, by model and request kind.",
                      "# TYPE vlmkit_batch_size histogram"]
            for (model, kind), histogram in sorted(self.batches.items()):
                lines += histogram.lines("vlmkit_batch_size", f'model="{_escape(model)}",kind="{kind}"')
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
