"""Profile imagebot (and the baseline) under load with py-spy, and summarise where time goes.

py-spy samples the bot process from outside (`--gil`: only the thread holding the GIL, i.e.
Python CPU time; `--nonblocking`: the bot is not paused). The raw collapsed stacks are saved
under bench/results/ (render them with any flamegraph tool); the summary attributes samples
to an *activity* (the outermost imagebot/PTB frame that explains why the work happens), to a
*layer* (the innermost library doing the work), to a *purpose* (why the CPU is spent: Bot API
calls, provider calls, SQLite, logging, Pillow, ...) and to the thread that held the GIL (main
loop, webhook intake, SQLite writer, aiosqlite reader; py-spy's `--threads`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.procs import Bot, run_load

# (label, substring of a frame), in priority order: the first entry found anywhere in the
# stack names the activity.
ACTIVITIES: tuple[tuple[str, str], ...] = (
    ("webhook ack (Intake._webhook)", "Intake._webhook"),
    ("webhook ack (baseline route)", "webhook_app.<locals>.webhook"),
    ("update handlers (request_job, 'Generating…')", "Application.process_update"),
    ("update handlers (request_job, 'Generating…')", "BaseUpdateProcessor.process_update"),
    ("job runner (submit/poll/fetch/deliver)", "JobRunner._job_callback"),
    ("job runner: pump after a job", "JobRunner.pump"),
    ("progress ticker (chat action, status edits)", "Progress._tick"),
    ("progress: queue refresh", "Progress.refresh_queue"),
    ("sqlite writer thread (Python side)", "_WriterThread._main"),
    ("sqlite reader thread (aiosqlite)", "_connection_worker_thread"),
    ("aiohttp server (parsing requests)", "web_protocol.py"),
    ("ops server", "ops_server.py"),
    ("event loop wait (epoll)", "EpollSelector.select"),
    ("event loop bookkeeping", "BaseEventLoop._run_once"),
)
# (label, substring), checked from the leaf of the stack up: first match wins.
LAYERS: tuple[tuple[str, str], ...] = (
    ("imports at run time (_find_and_load)", "_find_and_load"),
    ("imports at run time (_find_and_load)", "_path_stat"),
    ("HTTP client httpx (providers, fetcher)", "httpx/"),
    ("HTTP client httpx (providers, fetcher)", "httpcore/"),
    ("HTTP client httpx (providers, fetcher)", "h11/"),
    ("HTTP client httpx (providers, fetcher)", "anyio/"),
    ("aiohttp client (Bot API transport)", "aiohttp/client"),
    ("aiohttp client (Bot API transport)", "aiohttp/connector"),
    ("aiohttp client (Bot API transport)", "aiohttp/formdata"),
    ("aiohttp client (Bot API transport)", "aiohttp/multipart"),
    ("aiohttp client (Bot API transport)", "aiohttp/payload"),
    ("SQLite hand-off (aiosqlite reader)", "aiosqlite/"),
    ("PTB objects and requests (telegram/)", "telegram/"),
    ("aiohttp (server side, streams, helpers)", "aiohttp/"),
    ("Pillow", "PIL/"),
    ("JSON", "json/"),
    ("tenacity (retry wrappers)", "tenacity/"),
    ("structlog", "structlog/"),
    ("replicate client", "replicate/"),
    ("imagebot's own code", "imagebot/"),
    ("thread hand-off (queue, futures, threading)", "queue.py"),
    ("thread hand-off (queue, futures, threading)", "concurrent/futures"),
    ("thread hand-off (queue, futures, threading)", "threading.py"),
    ("asyncio internals", "asyncio/"),
)
# Why the CPU is spent, for the cost of a job by layer: (label, substrings), in priority
# order, the first label with a substring anywhere in the stack wins.
PURPOSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SQLite (store code, writer thread, aiosqlite)", ("imagebot/store/", "aiosqlite/")),
    ("structlog / logging", ("structlog/", "imagebot/logs.py", "logging/")),
    ("Pillow", ("PIL/",)),
    (
        "Bot API calls (PTB Bot, aiohttp client)",
        (
            "telegram/_bot.py",
            "telegram/ext/_extbot.py",
            "telegram/request/",
            "imagebot/botapi.py",
            "imagebot/delivery.py",
            "aiohttp/client",  # only the Bot API transport uses aiohttp's client
            "aiohttp/connector",
            "aiohttp/formdata",
            "aiohttp/multipart",
            "aiohttp/payload",
        ),
    ),
    (
        "provider calls, output fetch (httpx, replicate)",
        (
            "imagebot/providers/",
            "imagebot/media.py",
            "httpx/",
            "httpcore/",
            "h11/",
            "anyio/",
            "replicate/",
        ),
    ),
    (
        "webhook intake (its thread: aiohttp server, route)",
        ("imagebot/threaded_site.py", "Intake._webhook", "aiohttp/web_", "aiohttp/http_parser"),
    ),
    ("PTB dispatch (Application, JobQueue, APScheduler)", ("telegram/ext/", "apscheduler/")),
    ("imagebot's own code (other)", ("imagebot/",)),
    ("ops server / metrics", ("prometheus_client/",)),
    ("asyncio event loop (scheduling, selector)", ("asyncio/", "selectors.py")),
)
# Frames every main-loop stack starts with: not a reason for the work.
ENTRY_FRAMES = ("imagebot/__main__.py", "imagebot/cli.py", "(<frozen runpy>")


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy's raw format: 'frame;frame;... count' per line."""
    stacks: list[tuple[list[str], int]] = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _activity(frames: list[str]) -> str:
    for label, needle in ACTIVITIES:
        if any(needle in frame for frame in frames):
            return label
    return "other"


def _layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        for label, needle in LAYERS:
            if needle in frame:
                return label
    return "other"


def _purpose(frames: list[str]) -> str:
    frames = [f for f in frames if not any(entry in f for entry in ENTRY_FRAMES)]
    for label, needles in PURPOSES:
        if any(needle in frame for frame in frames for needle in needles):
            return label
    return "other"


def _thread(frames: list[str]) -> str:
    """py-spy --threads puts 'thread (0x…)' (plus the name, when known) at the root."""
    root = frames[0] if frames else ""
    if not root.startswith("thread ("):
        return "all threads"
    name = root.partition(":")[2].strip() or root
    if "_connection_worker_thread" in name or any(
        "_connection_worker_thread" in f for f in frames
    ):
        return "aiosqlite reader"
    if name.startswith("Thread-") or name.startswith("asyncio_"):
        return name.split(" (")[0].rstrip("0123456789_-") or name
    return name


def summarise(
    text: str, top: int = 15, rate_hz: float = 0, duration_s: float = 0
) -> dict[str, Any]:
    """Shares of samples by activity, layer, purpose and thread, and the hottest functions.

    With `rate_hz` and `duration_s`, also the share of the wall time in which some thread
    held the GIL (py-spy --gil samples only the thread holding it)."""
    stacks = parse_collapsed(text)
    total = sum(n for _, n in stacks) or 1
    activity: Counter[str] = Counter()
    layer: Counter[str] = Counter()
    purpose: Counter[str] = Counter()
    thread: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    ack_layers: Counter[str] = Counter()
    for frames, n in stacks:
        act = _activity(frames)
        activity[act] += n
        lay = _layer(frames)
        layer[lay] += n
        purpose[_purpose(frames)] += n
        thread[_thread(frames)] += n
        leaf[frames[-1]] += n
        if act.startswith("webhook ack"):
            ack_layers[lay] += n

    def shares(counter: Counter[str], limit: int | None = None) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(limit)]

    out: dict[str, Any] = {
        "samples": total,
        "by_thread_pct": shares(thread),
        "by_activity_pct": shares(activity),
        "by_layer_pct": shares(layer),
        "by_purpose_pct": shares(purpose),
        "webhook_ack_by_layer_pct": shares(ack_layers),
        "top_self_pct": shares(leaf, top),
    }
    if rate_hz and duration_s:
        out["gil_held_pct_of_wall"] = round(100 * total / (rate_hz * duration_s), 1)
    return out


def py_spy() -> str | None:
    """The py-spy executable next to this Python, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


RATE_HZ = 250


async def start_py_spy(
    pid: int, out_path: Path, duration_s: float, rate_hz: int = RATE_HZ
) -> asyncio.subprocess.Process:
    """py-spy record on `pid`: GIL-holding samples only, thread ids, raw collapsed stacks."""
    exe = py_spy()
    assert exe is not None
    return await asyncio.create_subprocess_exec(
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(duration_s)),
        "--rate",
        str(rate_hz),
        "--gil",
        "--threads",
        "--nonblocking",
        "--format",
        "raw",
        "-o",
        str(out_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def finish_py_spy(
    spy: asyncio.subprocess.Process, out_path: Path, duration_s: float
) -> dict[str, Any] | None:
    """Wait (bounded) for py-spy to end; summarise what it saved."""
    try:
        await asyncio.wait_for(spy.wait(), duration_s + 30)
    except TimeoutError:
        spy.kill()
        await spy.wait()
        return None
    return _summarise_file(out_path, duration_s)


async def stop_py_spy(
    spy: asyncio.subprocess.Process, out_path: Path, sampled_s: float, rate_hz: int = RATE_HZ
) -> dict[str, Any] | None:
    """Stop py-spy now (SIGINT makes it write what it has); summarise it."""
    if spy.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            spy.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(spy.wait(), 30)
    except TimeoutError:
        spy.kill()
        await spy.wait()
        return None
    return _summarise_file(out_path, sampled_s, rate_hz)


async def thread_names(pid: int) -> dict[int, str]:
    """OS thread id → Python thread name, from `py-spy dump --json` (bounded)."""
    exe = py_spy()
    if exe is None:
        return {}
    proc = await asyncio.create_subprocess_exec(
        exe,
        "dump",
        "--pid",
        str(pid),
        "--json",
        "--nonblocking",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {}
    try:
        threads = json.loads(out)
    except ValueError:
        return {}
    names: dict[int, str] = {}
    for t in threads:
        if t.get("os_thread_id") is not None:
            name = str(t.get("thread_name") or t["os_thread_id"])
            if any("_connection_worker_thread" in f.get("name", "") for f in t.get("frames", [])):
                name = "aiosqlite reader"
            names[int(t["os_thread_id"])] = name
    return names


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of `pid`, by OS thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for entry in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


async def profile_under_load(
    bot: Bot, spec: Any, out_path: Path, duration_s: float
) -> dict[str, Any] | None:
    """Run `spec` against `bot` while py-spy records it; save raw stacks; return the summary."""
    if py_spy() is None:
        return None
    spy = await start_py_spy(bot.pid, out_path, duration_s)
    await run_load(spec)
    return await finish_py_spy(spy, out_path, duration_s)


def _summarise_file(path: Path, sampled_s: float, rate_hz: int = RATE_HZ) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return summarise(path.read_text(), rate_hz=rate_hz, duration_s=sampled_s)
