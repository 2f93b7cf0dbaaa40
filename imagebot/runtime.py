"""Interpreter tuning for a process that answers webhooks on one thread while the event loop
runs jobs on another: how often the GIL changes hands and when the garbage collector stops
every thread. The figures behind each default are in BENCHMARKS.md ("Profile").

Both can be overridden from the environment, for measuring (bench.experiments) rather than
for operators: IMAGEBOT_GIL_SWITCH_S (seconds) and IMAGEBOT_GC_THRESHOLDS ("700,10,100").
"""

from __future__ import annotations

import gc
import os
import sys

from imagebot.errors import ConfigError

GIL_SWITCH_ENV = "IMAGEBOT_GIL_SWITCH_S"
GC_THRESHOLDS_ENV = "IMAGEBOT_GC_THRESHOLDS"
# The webhook thread must get the GIL quickly while the main loop is busy: each switch hands
# over after this long instead of CPython's default 5 ms.
GIL_SWITCH_S = 0.0005
# CPython's (700, 10, 10) runs a full collection after every 10 middle-generation ones: under
# load, every 4 s, and each one holds the GIL for 23-69 ms while it walks the live jobs, so
# the webhook answers waiting behind it made the ack p99. After 100, full collections come
# 10x less often; a job's cyclic garbage (retry state, HTTP responses) is still freed by the
# young collections, which stay as they are.
GC_THRESHOLDS = (700, 10, 100)


def gil_switch_interval() -> float:
    raw = os.environ.get(GIL_SWITCH_ENV)
    if raw is None:
        return GIL_SWITCH_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise ConfigError(GIL_SWITCH_ENV, f"must be seconds in (0, 1], got {raw!r}")
    return value


def gc_thresholds() -> tuple[int, int, int]:
    raw = os.environ.get(GC_THRESHOLDS_ENV)
    if raw is None:
        return GC_THRESHOLDS
    try:
        values = tuple(int(v) for v in raw.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 1 for v in values):
        raise ConfigError(GC_THRESHOLDS_ENV, f"must be three positive integers, got {raw!r}")
    return values[0], values[1], values[2]


def tune_interpreter() -> None:
    """Set the GIL switch interval and the GC thresholds (raises ConfigError on bad overrides)."""
    switch, thresholds = gil_switch_interval(), gc_thresholds()
    sys.setswitchinterval(switch)
    gc.set_threshold(*thresholds)


def freeze_startup_objects() -> None:
    """Move everything alive now (modules, PTB, settings: alive as long as the process) out of
    the collector's generations, so no collection under load walks them again: collections
    then walk only what was made since (jobs, requests)."""
    gc.collect()
    gc.freeze()


def thaw_startup_objects() -> None:
    """Undo freeze_startup_objects when the bot stops, so a process that runs several bots
    (the tests) can collect a stopped bot's objects."""
    gc.unfreeze()
