"""The benchmark's processes: the fakes, imagebot, the baseline bot and the load generator.

Everything listens on 127.0.0.1 only, on ports the OS picks (port 0) and read back from the
process that bound them. Every wait is a bounded poll, and every process started here is
stopped here (SIGTERM, then SIGKILL after a bounded wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench.load import Spec
from tests.fakes.front_door import FrontDoor
from tests.support import deep_merge, toml_dumps

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOST = "127.0.0.1"
BOT_TOKEN = "123456:BENCH-token_abc"  # noqa: S105 - the fakes' credentials
REPLICATE_TOKEN = "r8_bench_token"  # noqa: S105
FAL_KEY = "bench_key_id:bench_key_secret"
WEBHOOK_SECRET = "bench-webhook_s3cret"  # noqa: S105
WEBHOOK_PATH = "/telegram/webhook"
_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


class BenchError(RuntimeError):
    """A process did not start or answer as expected."""


def check_loopback(url: str) -> str:
    """Return `url` if its host is a loopback address; raise otherwise."""
    host = urlsplit(url).hostname or ""
    if not ipaddress.ip_address(host).is_loopback:
        raise BenchError(f"refusing a non-loopback URL: {url}")
    return url


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without IMAGEBOT_* or vendor secrets, plus `extra`."""
    drop = {"TELEGRAM_BOT_TOKEN", "REPLICATE_API_TOKEN", "FAL_KEY", "STATE_DIRECTORY"}
    drop |= {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBOT_") and k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _write(path: Path, text: str) -> Path:
    """Write `text` to `path`, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


async def _stop(proc: asyncio.subprocess.Process, within: float = 30.0) -> int | None:
    """SIGTERM, bounded wait, then SIGKILL; returns the exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), within)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
    return proc.returncode


async def _first_line(proc: asyncio.subprocess.Process, within: float, what: str) -> str:
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), within)
    except TimeoutError:
        await _stop(proc, 5)
        raise BenchError(f"{what} printed nothing within {within} s") from None
    if not line:
        await _stop(proc, 5)
        raise BenchError(f"{what} exited before it was ready (code {proc.returncode})")
    return line.decode().strip()


# -- the fakes ---------------------------------------------------------------------------------


@dataclass
class Fakes:
    """The fakes process (bench/fakes.py) and a client for its control routes."""

    proc: asyncio.subprocess.Process
    urls: dict[str, str]
    session: aiohttp.ClientSession

    @classmethod
    async def start(cls) -> Fakes:
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "bench.fakes",
            "--telegram-token",
            BOT_TOKEN,
            "--replicate-token",
            REPLICATE_TOKEN,
            "--fal-key",
            FAL_KEY,
            cwd=ROOT,
            env=clean_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        urls = json.loads(await _first_line(proc, 20, "bench.fakes"))
        for url in urls.values():
            check_loopback(url)
        return cls(proc, urls, aiohttp.ClientSession(timeout=_HTTP_TIMEOUT))

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        url = f"{self.urls['control']}{path}"
        async with self.session.request(method, url, **kwargs) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def reset(self) -> None:
        await self._call("POST", "/reset")

    async def configure(self, **values: Any) -> None:
        await self._call("POST", "/configure", json=values)

    async def add_file(self, data: bytes) -> str:
        answer = await self._call("POST", "/telegram/file", data=data)
        return str(answer["file_id"])

    async def sent(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call("GET", "/telegram/sent")
        return result

    async def calls(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call("GET", "/telegram/calls")
        return result

    async def predictions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call("GET", "/replicate/predictions")
        return result

    async def fal_requests(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call("GET", "/fal/requests")
        return result

    async def state(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/state")
        return result

    async def stop(self) -> None:
        await self.session.close()
        await _stop(self.proc, 10)


# -- the bots ----------------------------------------------------------------------------------


def imagebot_config(fakes: Fakes, workdir: Path, front_door: FrontDoor) -> dict[str, Any]:
    """imagebot's settings for the benchmark: the fakes, loopback only, OS-picked ports, no
    artificial limits (each report overrides what it measures). The public webhook URL (what
    Telegram and the vendors' completion hints reach) is `front_door`; the load generator
    posts to the bound webhook port directly."""
    return {
        "telegram": {
            "mode": "webhook",
            "api_base_url": fakes.urls["telegram"],
            "rate_overall_per_s": 1000,
            "rate_per_chat_per_s": 30,
            "rate_group_per_min": 600,
        },
        "webhook": {
            "url": f"{front_door.url}{WEBHOOK_PATH}",
            "listen": HOST,
            "port": 0,
            "path": WEBHOOK_PATH,
        },
        "ops": {"listen": HOST, "port": 0},
        "storage": {
            "database": str(workdir / "imagebot.db"),
            "results_dir": str(workdir / "results"),
        },
        "access": {"open": True},
        "limits": {"rate_per_minute": 1000},
        "generate": {"daily_cap": 1_000_000},
        "edit": {"daily_cap": 1_000_000},
        "replicate": {"base_url": fakes.urls["replicate"]},
        "fal": {"base_url": fakes.urls["fal"]},
        "media": {
            "allowed_hosts": [HOST],
            "allowed_private_networks": [f"{HOST}/32"],
        },
        # WARNING keeps per-update log I/O off the hot path being measured.
        "logs": {"format": "json", "level": "WARNING"},
    }


@dataclass
class Bot:
    """A running bot process (imagebot or the baseline) and where to reach it."""

    name: str
    proc: asyncio.subprocess.Process
    webhook_url: str
    ops_url: str | None
    log_path: Path
    ready_s: float
    session: aiohttp.ClientSession = field(repr=False)
    front_door: FrontDoor | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def spec(self, **fields: Any) -> Spec:
        """A load Spec aimed at this bot's webhook."""
        return Spec(url=self.webhook_url, secret=WEBHOOK_SECRET, **fields)

    async def healthz(self) -> dict[str, Any]:
        assert self.ops_url is not None
        async with self.session.get(f"{self.ops_url}/healthz") as resp:
            body: dict[str, Any] = await resp.json()
            return body

    async def metrics(self) -> str:
        assert self.ops_url is not None
        async with self.session.get(f"{self.ops_url}/metrics") as resp:
            return await resp.text()

    def rss(self) -> dict[str, int]:
        return rss_kb(self.pid)

    def log_problems(self) -> list[str]:
        """Log lines at error level or worse (the bot logs at WARNING in the benchmark)."""
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [ln for ln in lines if '"level": "error"' in ln or "Traceback" in ln]

    async def stop(self) -> int | None:
        await self.session.close()
        try:
            return await _stop(self.proc, 40)
        finally:
            if self.front_door is not None:
                await self.front_door.stop()


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (Linux: its socket inodes in /proc/<pid>/fd
    matched against the LISTEN rows of /proc/<pid>/net/tcp and tcp6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # an fd closed meanwhile
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


async def _wait_ready(
    proc: asyncio.subprocess.Process, session: aiohttp.ClientSession, within: float
) -> tuple[int, int]:
    """Wait until one of the ports `proc` listens on answers GET /healthz with 200 (the ops
    port: the bot is ready, so its webhook listens too); return (ops port, webhook port)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise BenchError(f"bot exited during start-up (code {proc.returncode})")
        ports = listening_ports(proc.pid)
        for port in ports:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                url = f"http://{HOST}:{port}/healthz"
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        (webhook,) = listening_ports(proc.pid) - {port}
                        return port, webhook
        await asyncio.sleep(0.01)
    raise BenchError(f"imagebot not ready within {within} s")


async def start_imagebot(
    fakes: Fakes,
    workdir: Path,
    overrides: dict[str, Any] | None = None,
    *,
    module: str = "imagebot",
    extra_env: dict[str, str] | None = None,
) -> Bot:
    """Start `python -m imagebot --webhook` on a generated config; ready = 200 on /healthz.

    `module` may name a wrapper that runs imagebot's CLI (bench.research.instrumented)."""
    upstream: list[int] = []  # the webhook port, once the bot is ready
    front_door = await FrontDoor(lambda: upstream[0] if upstream else None).start()
    config = deep_merge(imagebot_config(fakes, workdir, front_door), overrides or {})
    config_path = _write(workdir / "config.toml", toml_dumps(config))
    env = clean_env(
        TELEGRAM_BOT_TOKEN=BOT_TOKEN,
        REPLICATE_API_TOKEN=REPLICATE_TOKEN,
        FAL_KEY=FAL_KEY,
        IMAGEBOT_WEBHOOK_SECRET=WEBHOOK_SECRET,
        **(extra_env or {}),
    )
    log_path = workdir / "imagebot.log"
    session = aiohttp.ClientSession(timeout=_HTTP_TIMEOUT)
    with log_path.open("ab") as log:
        spawned = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            module,
            "--webhook",
            "--config",
            str(config_path),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        ops_port, webhook_port = await _wait_ready(proc, session, 30)
    except (BenchError, ValueError):  # ValueError: not exactly one other listening port
        await session.close()
        await _stop(proc, 10)
        await front_door.stop()
        tail = _tail(log_path)
        raise BenchError(f"imagebot did not start; log tail:\n{tail}") from None
    ready_s = time.monotonic() - spawned
    upstream.append(webhook_port)
    return Bot(
        "imagebot",
        proc,
        f"http://{HOST}:{webhook_port}{WEBHOOK_PATH}",
        f"http://{HOST}:{ops_port}",
        log_path,
        ready_s,
        session,
        front_door,
    )


async def start_baseline(fakes: Fakes, workdir: Path) -> Bot:
    """Start bench/baseline_bot.py; ready when it prints 'ready <port>'."""
    _write(workdir / "baseline.log", "")
    log_path = workdir / "baseline.log"
    with log_path.open("ab") as log:
        spawned = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "bench.baseline_bot",
            "--api-base",
            fakes.urls["telegram"],
            "--port",
            "0",
            "--secret",
            WEBHOOK_SECRET,
            cwd=ROOT,
            env=clean_env(TELEGRAM_BOT_TOKEN=BOT_TOKEN),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    port = int((await _first_line(proc, 30, "bench.baseline_bot")).split()[1])  # "ready <port>"
    ready_s = time.monotonic() - spawned
    session = aiohttp.ClientSession(timeout=_HTTP_TIMEOUT)
    url = f"http://{HOST}:{port}{WEBHOOK_PATH}"
    return Bot("baseline", proc, url, None, log_path, ready_s, session)


# -- the load generator ------------------------------------------------------------------------


async def run_load(spec: Spec) -> dict[str, Any]:
    """Run bench/load.py in its own process and return its JSON result."""
    check_loopback(spec.url)
    for url in spec.urls:
        check_loopback(url)
    payload = json.dumps(dataclasses.asdict(spec))
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "bench.load",
        "--spec",
        payload,
        cwd=ROOT,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
    )
    budget = spec.count / spec.rate + spec.grace_s + 30
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), budget)
    except TimeoutError:
        await _stop(proc, 5)
        raise BenchError(f"load generator still running after {budget:.0f} s") from None
    if proc.returncode != 0:
        raise BenchError(f"load generator failed (code {proc.returncode})")
    result: dict[str, Any] = json.loads(out)
    return result


def main_thread_schedule(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a process's main thread so
    far, from /proc/<pid>/task/<pid>/schedstat; (0, 0) where the kernel does not keep it."""
    try:
        ran, waited, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(ran) / 1e9, int(waited) / 1e9


def machine_busy_seconds() -> tuple[float, float]:
    """(CPU seconds busy, CPU seconds in all) of the whole machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
