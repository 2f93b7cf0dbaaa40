"""Percentiles, and the Prometheus histogram reader used as a cross-check."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(value: float | None) -> float | None:
    """Seconds to milliseconds, rounded to 0.1 ms."""
    return None if value is None else round(value * 1000, 1)


def summary_ms(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p95, p99 and max in milliseconds."""
    return {
        "n": len(values),
        "p50_ms": ms(percentile(values, 50)),
        "p95_ms": ms(percentile(values, 95)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values) if values else None),
    }


_BUCKET = re.compile(r"^(?P<name>\w+)_bucket\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def histogram_buckets(text: str, name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) of a Prometheus histogram, summed over its labels."""
    sums: dict[float, float] = {}
    for line in text.splitlines():
        m = _BUCKET.match(line)
        if not m or m["name"] != name:
            continue
        le = re.search(r'le="([^"]+)"', m["labels"])
        if le is None:
            continue
        bound = math.inf if le[1] == "+Inf" else float(le[1])
        sums[bound] = sums.get(bound, 0.0) + float(m["value"])
    return sorted(sums.items())


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style quantile (q in 0-1) by linear interpolation inside the bucket."""
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    target = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= target:
            if math.isinf(bound):
                return prev_bound
            span = count - prev_count
            frac = (target - prev_count) / span if span else 0.0
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_count = bound, count
    return prev_bound
