"""Profile imagebot (and the baseline) under load with py-spy, and summarise where time goes.

py-spy samples the bot process from outside (`--gil`: only the thread holding the GIL, i.e.
Python CPU time; `--nonblocking`: the bot is not paused). The raw collapsed stacks are saved
under bench/results/ (render them with any flamegraph tool); the summary attributes samples
to an *activity* (the outermost imagebot/PTB frame that explains why the work happens) and to
a *layer* (the innermost library doing the work).
"""

from __future__ import annotations

import asyncio
import shutil
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
    ("aiohttp server (parsing requests)", "web_protocol.py"),
    ("ops server", "ops_server.py"),
    ("sqlite worker threads (aiosqlite)", "_connection_worker_thread"),
    ("event loop wait (epoll)", "EpollSelector.select"),
    ("event loop bookkeeping", "BaseEventLoop._run_once"),
)
# (label, substring), checked from the leaf of the stack up: first match wins.
LAYERS: tuple[tuple[str, str], ...] = (
    ("failed 'import sniffio' (httpcore, per call)", "_find_and_load"),
    ("failed 'import sniffio' (httpcore, per call)", "_path_stat"),
    ("HTTP client (httpx/httpcore/h11/anyio)", "httpx/"),
    ("HTTP client (httpx/httpcore/h11/anyio)", "httpcore/"),
    ("HTTP client (httpx/httpcore/h11/anyio)", "h11/"),
    ("HTTP client (httpx/httpcore/h11/anyio)", "anyio/"),
    ("SQLite hand-off (aiosqlite)", "aiosqlite/"),
    ("PTB objects and requests (telegram/)", "telegram/"),
    ("aiohttp (server side)", "aiohttp/"),
    ("Pillow", "PIL/"),
    ("JSON", "json/"),
    ("tenacity (retry wrappers)", "tenacity/"),
    ("structlog", "structlog/"),
    ("replicate client", "replicate/"),
    ("imagebot's own code", "imagebot/"),
    ("asyncio internals", "asyncio/"),
)


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


def summarise(text: str, top: int = 15) -> dict[str, Any]:
    """Shares of samples by activity, by layer, and the hottest functions (self time)."""
    stacks = parse_collapsed(text)
    total = sum(n for _, n in stacks) or 1
    activity: Counter[str] = Counter()
    layer: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    ack_layers: Counter[str] = Counter()
    for frames, n in stacks:
        act = _activity(frames)
        activity[act] += n
        lay = _layer(frames)
        layer[lay] += n
        leaf[frames[-1]] += n
        if act.startswith("webhook ack"):
            ack_layers[lay] += n

    def shares(counter: Counter[str], limit: int | None = None) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(limit)]

    return {
        "samples": total,
        "by_activity_pct": shares(activity),
        "by_layer_pct": shares(layer),
        "webhook_ack_by_layer_pct": shares(ack_layers),
        "top_self_pct": shares(leaf, top),
    }


def py_spy() -> str | None:
    """The py-spy executable next to this Python, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


async def profile_under_load(
    bot: Bot, spec: Any, out_path: Path, duration_s: float
) -> dict[str, Any] | None:
    """Run `spec` against `bot` while py-spy records it; save raw stacks; return the summary."""
    exe = py_spy()
    if exe is None:
        return None
    spy = await asyncio.create_subprocess_exec(
        exe,
        "record",
        "--pid",
        str(bot.pid),
        "--duration",
        str(int(duration_s)),
        "--rate",
        "250",
        "--gil",
        "--nonblocking",
        "--format",
        "raw",
        "-o",
        str(out_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await run_load(spec)
    try:
        await asyncio.wait_for(spy.wait(), duration_s + 30)
    except TimeoutError:
        spy.kill()
        await spy.wait()
        return None
    return _summarise_file(out_path)


def _summarise_file(path: Path) -> dict[str, Any] | None:
    return summarise(path.read_text()) if path.exists() else None
