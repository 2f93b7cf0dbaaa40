"""`python -m bench`: run every report, print the table, write bench/results/latest.json."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import cluster, postgresql, scenarios
from bench.procs import Fakes
from bench.scenarios import Context

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPORTS = ("ack", "added", "memory", "startup", "flood", "postgresql", "cluster")
RUN_LIMIT_S = 1500  # a hard stop far above the expected ~8-10 minutes

Row = tuple[str, str, str, str, str]


def revision() -> str:
    """The git commit the benchmark ran on, with '+dirty' when imagebot/ has local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "imagebot"],  # noqa: S607
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def calibrate() -> float:
    """Milliseconds for a fixed pure-Python workload (best of 5): how fast this machine runs
    Python right now. It moves between runs on a shared host; every figure moves with it."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(200_000):
            total += i % 7
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "revision": revision(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:g}"
    return f"{value}{unit}"


def _bounded(bot: dict[str, Any]) -> bool:
    """The step-up stopped before a failing step: the rate is a lower bound."""
    return bot.get("step_up_stopped_by") in ("time budget", "top rate")


def _sustained(bot: dict[str, Any]) -> str:
    text = _fmt(bot["max_sustained_rate"])
    return f">= {text}" if _bounded(bot) else text


def _ratio_verdict(ratio: float | None, mine_bounded: bool, base_bounded: bool) -> str:
    """A bounded imagebot rate makes the ratio a lower bound, a bounded baseline rate an upper
    bound: judge only what the bound decides."""
    if ratio is None:
        return "not measured"
    if ratio >= 0.7 and not base_bounded:
        return f"met ({_fmt(ratio)}{', at least' if mine_bounded else ''})"
    if ratio < 0.7 and not mine_bounded:
        return f"MISSED ({_fmt(ratio)}{', at most' if base_bounded else ''})"
    return f"not judged ({_fmt(ratio)}: a step-up stopped before a failing step)"


def _three(fig: dict[str, Any]) -> str:
    return "/".join(_fmt(fig.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms"))


def _two(fig: dict[str, Any]) -> str:
    return "/".join(_fmt(fig.get(k)) for k in ("p50_ms", "p99_ms"))


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def _ack_rows(ack: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    ib, base = ack["bots"]["imagebot"], ack["bots"]["baseline"]
    for rate in ("50", "200"):
        fig_i, fig_b = ib["fixed"][rate], base["fixed"][rate]
        p99 = fig_i.get("p99_ms")
        rows.append(
            (
                f"1 webhook ack @{rate}/s p50/p95/p99 ms",
                _three(fig_i),
                _three(fig_b),
                "p99 < 50",
                _met(p99 is not None and p99 < 50 and not fig_i["errors"]),
            )
        )
        rows.append(
            (
                f"  CPU per update @{rate}/s (ms)",
                _fmt(fig_i["cpu_ms_per_update"]),
                _fmt(fig_b["cpu_ms_per_update"]),
                "",
                "",
            )
        )
    for name, bot in (("imagebot", ib), ("baseline", base)):
        steps = bot.get("steps") or []
        if steps:
            detail = ", ".join(f"{st['rate']}:{_fmt(st['p99_ms'])}" for st in steps)
            last = steps[-1]
            cores = last.get("cores") or {}
            rows.append(
                (
                    f"  {name} step-up p99 ms by rate",
                    detail,
                    "",
                    "",
                    f"cores at {last['rate']}/s: bot {cores.get('bot')}, fakes "
                    f"{cores.get('fakes')}, load {cores.get('load')}",
                )
            )
    rows.append(
        (
            "1 max sustained rate, p99 < 100 ms (upd/s)",
            _sustained(ib),
            _sustained(base),
            "ratio >= 0.7",
            _ratio_verdict(ack["throughput_ratio"], _bounded(ib), _bounded(base)),
        )
    )
    for rate in ("50", "200"):
        rows.append(
            (
                f"2 update -> 'Generating…' @{rate}/s p50/p99 ms",
                _two(ib["reply"][rate]),
                _two(base["reply"][rate]),
                "",
                "",
            )
        )
    metric = ib["reply"]["50"].get("metric")
    if metric:
        rows.append(("  (imagebot_ack_latency_seconds @50/s)", _two(metric), "", "histogram", ""))
    return rows


def _added_rows(added: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for run in added["runs"]:
        # Without hints (as in --polling mode, which has no listener for them) x is half a
        # poll interval plus the fetch: shown for comparison, the target is the webhook
        # mode's, where hints are on by default.
        polling_only = run.get("variant") == "no-hints"
        how = "polling only" if polling_only else "hints"
        for kind in ("generate", "edit"):
            fig = run[kind]
            p50 = fig.get("p50_ms")
            if polling_only:
                target = "comparison"
                verdict = f"LOST {fig['missing']}" if fig["missing"] else "not judged"
            else:
                target = "p50 < 150"
                verdict = _met(p50 is not None and p50 < 150 and not fig["missing"])
            rows.append(
                (
                    f"3 added latency /{kind} {run['rate_per_kind']:g}/s, {how}, poll "
                    f"{run['poll_interval_s']} s, p50/p99 ms",
                    _two(fig),
                    "",
                    target,
                    verdict,
                )
            )
            if "poll_delay" in fig:
                rows.append(
                    (
                        "  x = poll delay + after poll, p50 ms; polls/job",
                        f"{_fmt(fig['poll_delay']['p50_ms'])} + "
                        f"{_fmt(fig['after_poll']['p50_ms'])}; {_fmt(fig['polls_per_job'])}",
                        "",
                        "",
                        "",
                    )
                )
    return rows


def _memory_rows(mem: dict[str, Any]) -> list[Row]:
    return [
        ("4 RSS idle (MB)", _fmt(mem["idle_rss_mb"]), "", "< 120", _met(mem["idle_rss_mb"] < 120)),
        (
            f"4 RSS, {mem['running']} running + {mem['queued']} queued (MB)",
            _fmt(mem["loaded_rss_mb"]),
            "",
            "< 200",
            _met(mem["loaded_rss_mb"] < 200),
        ),
    ]


def _startup_rows(start: dict[str, Any]) -> list[Row]:
    return [
        (
            "5 start-up to /healthz 200, median (s)",
            f"{_fmt(start['median_s'])} "
            f"(all {start['all_starts_n']}: {start['all_starts_median_s']})",
            "",
            "< 2",
            _met(start["median_s"] < 2),
        )
    ]


def _flood_rows(flood: dict[str, Any]) -> list[Row]:
    n = flood["results_expected"]
    return [
        (
            f"6 flood: {n} results/{flood['chats']} chats, 429s",
            _fmt(flood["telegram_429s"]),
            "",
            "0",
            _met(flood["telegram_429s"] == 0),
        ),
        ("6 flood: results lost", _fmt(flood["lost"]), "", "0", _met(flood["lost"] == 0)),
        ("6 flood: time to drain (s)", _fmt(flood["drain_s"]), "", "", ""),
    ]


def _profile_rows(prof: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for name in ("imagebot", "baseline"):
        summary = prof.get(name) or {}
        if "gil_held_pct_of_wall" in summary:
            rows.append(
                (
                    f"P GIL held (% of wall) @{prof['rate']:g}/s, {name}",
                    _fmt(summary["gil_held_pct_of_wall"]),
                    "",
                    "",
                    "",
                )
            )
    e2e = prof.get("end_to_end")
    sampled = prof.get("end_to_end_sampled")
    if e2e and sampled:
        e2e = {
            **e2e,
            "cpu_ms_per_job": f"{e2e['cpu_ms_per_job']} ({sampled['cpu_ms_per_job']} "
            "under py-spy)",
        }
    if e2e:
        rows.append(
            (
                f"P CPU per /generate end to end @{e2e['rate']:g}/s (ms)",
                _fmt(e2e["cpu_ms_per_job"]),
                "",
                "",
                ", ".join(
                    f"{k} {v}" for k, v in list(e2e["cpu_ms_per_job_by_thread"].items())[:4]
                ),
            )
        )
    counters = prof.get("counters")
    if counters:
        rows.append(
            (
                "P writer-thread calls / aiosqlite reads per update",
                f"{_fmt(counters['writer_calls_per_update'])} / "
                f"{_fmt(counters['reads_per_update'])}",
                "",
                "",
                "",
            )
        )
    return rows


def _postgresql_rows(pg: dict[str, Any]) -> list[Row]:
    """PostgreSQL in the imagebot column, SQLite (same run, taking turns) beside it."""
    lite, post = pg["stores"]["sqlite"], pg["stores"]["postgresql"]
    rows: list[Row] = []
    for rate in ("50", "200"):
        fig_p, fig_s = post["fixed"][rate], lite["fixed"][rate]
        target, verdict = "", ""
        if rate == "200":
            ratio = pg.get("ack_p99_200_ratio")
            target = "p99 <= 2x SQLite"
            verdict = "not measured" if ratio is None else f"{_met(ratio <= 2)} ({_fmt(ratio)}x)"
        rows.append(
            (
                f"7 PostgreSQL ack @{rate}/s p50/p95/p99 ms",
                _three(fig_p),
                f"SQLite {_three(fig_s)}",
                target,
                verdict,
            )
        )
        rows.append(
            (
                f"  CPU per update @{rate}/s bot + server (ms)",
                f"{_fmt(fig_p['cpu_ms_per_update'])} + {_fmt(fig_p['server_cpu_ms_per_update'])}",
                f"SQLite {_fmt(fig_s['cpu_ms_per_update'])}",
                "",
                "",
            )
        )
    rows.append(
        (
            "7 PostgreSQL max sustained, p99 < 100 ms (upd/s)",
            _sustained(post),
            f"SQLite {_sustained(lite)}",
            "",
            "",
        )
    )
    e2e_p, e2e_s = post["end_to_end"], lite["end_to_end"]
    rows.append(
        (
            "7 CPU per /generate job, bot + server (ms)",
            f"{_fmt(e2e_p['cpu_ms_per_job'])} + {_fmt(e2e_p['server_cpu_ms_per_job'])}",
            f"SQLite {_fmt(e2e_s['cpu_ms_per_job'])}",
            "",
            f"delivered {e2e_p['delivered']}/{e2e_p['jobs']} and {e2e_s['delivered']}/"
            f"{e2e_s['jobs']}",
        )
    )
    mem_p, mem_s = post["memory"], lite["memory"]
    rows.append(
        (
            "7 RSS idle / 100 running + queued (MB)",
            f"{_fmt(mem_p['idle_rss_mb'])} / {_fmt(mem_p['loaded_rss_mb'])}",
            f"SQLite {_fmt(mem_s['idle_rss_mb'])} / {_fmt(mem_s['loaded_rss_mb'])}",
            "",
            "",
        )
    )
    settings = pg.get("durability") or {}
    rows.append(
        (
            "7 PostgreSQL durability",
            ", ".join(f"{k}={v}" for k, v in settings.items() if k != "server_version"),
            f"PostgreSQL {settings.get('server_version', '?')}",
            "",
            "",
        )
    )
    return rows


def _cpu_wait(data: dict[str, Any]) -> str:
    """ "85% 1.0+1.0/2.2+2.3": the machine's busy share over the load, then each bot's main
    thread: seconds it ran / seconds it waited, ready, for a CPU."""
    cpu = data.get("cpu") or {}
    share = cpu.get("machine_busy_share")
    ran = "+".join(_fmt(v) for v in cpu.get("main_thread_ran_s") or [])
    waited = "+".join(_fmt(v) for v in cpu.get("main_thread_waited_s") or [])
    busy = "-" if share is None else f"{round(100 * share)}%"
    return f"{busy} {ran}/{waited}"


def _cluster_rows(fig: dict[str, Any]) -> list[Row]:
    """Report 8: one value per set-up (SQLite x1 / PostgreSQL x1 / PostgreSQL x2)."""
    setups = fig["setups"]
    names = list(setups)
    order = " / ".join(names)

    def each(part: str, pick: Callable[[dict[str, Any]], Any]) -> str:
        values = []
        for name in names:
            data = setups[name].get(part) or {}
            values.append("failed" if "error" in data else _fmt(pick(data)))
        return " / ".join(values)

    def verdict(key: str) -> str:
        target = fig["targets"][key]
        met = target["met"]
        return "not measured" if met is None else f"{_met(met)} ({_fmt(target['value'])})"

    rate = "rate_200"
    rows: list[Row] = [
        ("8 set-ups", order, "", "", ""),
        (
            "8 jobs/s at saturation",
            each("saturation", lambda d: d.get("jobs_per_s")),
            f"whole run {each('saturation', lambda d: d.get('jobs_per_s_whole_run'))}",
            "pg x2 >= 1.6x pg x1",
            verdict("scale"),
        ),
        (
            "  delivered / offered, duplicate creates / photos",
            each("saturation", lambda d: f"{d.get('delivered')}/{d.get('offered')}"),
            each(
                "saturation",
                lambda d: f"{d.get('duplicate_creates')}/{d.get('duplicate_photos')}",
            ),
            "",
            "",
        ),
        (
            "  CPU ms per job, bots + server",
            each(
                "saturation",
                lambda d: f"{d.get('cpu_ms_per_job_bots')}+{d.get('cpu_ms_per_job_server')}",
            ),
            "",
            "",
            "",
        ),
        (
            "8 update -> first reply @200/s p50/p99 ms",
            each(rate, lambda d: _two(d.get("reply") or {})),
            f"missing {each(rate, lambda d: (d.get('reply') or {}).get('missing'))}",
            "pg x2 p99 < 1000",
            verdict("reply_p99_ms_pg2"),
        ),
        (
            "  database transactions per update @200/s",
            each(rate, lambda d: d.get("db_transactions_per_update", "-")),
            "",
            "",
            "",
        ),
        (
            "  machine busy; main threads ran / waited for a CPU s",
            each(rate, _cpu_wait),
            "",
            "",
            "",
        ),
        (
            "8 webhook ack @200/s p99 ms (errors)",
            each(rate, lambda d: f"{(d.get('ack') or {}).get('p99_ms')}"),
            each(rate, lambda d: (d.get("ack") or {}).get("errors")),
            "",
            "",
        ),
    ]
    for name in names:
        for part, data in setups[name].items():
            if isinstance(data, dict) and "error" in data:
                rows.append((f"  {name} {part} failed", data["error"][:80], "", "", ""))
    return rows


def table(results: dict[str, Any]) -> list[Row]:
    """The rows of the printed table (also stored in the JSON)."""
    reports = results["reports"]
    rows: list[Row] = []
    builders: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
        "ack": _ack_rows,
        "added": _added_rows,
        "memory": _memory_rows,
        "startup": _startup_rows,
        "flood": _flood_rows,
        "profile": _profile_rows,
        "postgresql": _postgresql_rows,
        "cluster": _cluster_rows,
    }
    for name, build in builders.items():
        if name in reports:
            rows += build(reports[name])
    return rows


def render(results: dict[str, Any]) -> str:
    """The table as text, headed by the machine."""
    m = results["machine"]
    head = (
        f"imagebot benchmark: {m['cpus']} CPUs, {m['implementation']} {m['python']}, "
        f"{m['platform']}, {m['when']}, rev {m['revision']} ({results['duration_s']:.0f} s)"
    )
    if m.get("calibration_ms"):
        before, after = m["calibration_ms"]
        head += (
            f"\ncalibration (a fixed Python loop, lower is faster): {before} ms before, "
            f"{after} ms after"
        )
    header: Row = ("figure", "imagebot", "baseline", "target", "")
    rows = [header, *results["table"]]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [head, ""]
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the fakes, run the chosen reports in order, stop everything."""
    only = [r for r in (args.only or ",".join(REPORTS)).split(",") if r]
    unknown = set(only) - set(REPORTS) - {"profile"}
    if unknown:
        raise SystemExit(f"unknown report(s): {', '.join(sorted(unknown))}")
    if args.profile and "profile" not in only:
        only.append("profile")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="imagebot-bench-"))
    speed_before = calibrate()
    started = time.monotonic()
    reports: dict[str, Any] = {}
    fakes = await Fakes.start()
    ctx = Context(fakes, workdir, quick=args.quick, provider_latency_s=args.provider_latency)
    steps: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
        "ack": lambda: scenarios.report_ack(ctx),
        "added": lambda: scenarios.report_added_latency(ctx),
        "memory": lambda: scenarios.report_memory(ctx),
        "flood": lambda: scenarios.report_flood(ctx),
        "startup": lambda: scenarios.report_startup(ctx),
        "profile": lambda: scenarios.report_profile(ctx, RESULTS_DIR),
        "postgresql": lambda: postgresql.report_postgresql(ctx),
        "cluster": lambda: cluster.report_cluster(ctx),
    }
    try:
        # start-up last: it reports every start of the run as well as its own three (the
        # PostgreSQL report's starts come after it, so "every start" stays SQLite's)
        last = ("startup", "postgresql", "cluster", "profile")
        for name in sorted(only, key=lambda n: last.index(n) + 1 if n in last else 0):
            t0 = time.monotonic()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            reports[name] = await steps[name]()
            print(f"[bench] {name} done in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    finally:
        await fakes.stop()
        if args.keep_workdir:
            print(f"[bench] work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, Any] = {
        "machine": {**machine(), "calibration_ms": [speed_before, calibrate()]},
        "settings": {
            "quick": args.quick,
            "provider_latency_s": args.provider_latency,
            "imagebot_log_level": "WARNING",
        },
        "reports": reports,
        "duration_s": round(time.monotonic() - started, 1),
    }
    results["table"] = table(results)
    return results


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run, print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter loads (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="also profile with py-spy")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(REPORTS)}")
    parser.add_argument(
        "--provider-latency",
        type=float,
        default=scenarios.PROVIDER_LATENCY_S,
        help="fake provider latency in seconds for the load reports",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json")
    parser.add_argument("--keep-workdir", action="store_true", help="keep databases and logs")
    args = parser.parse_args(argv)
    results = asyncio.run(asyncio.wait_for(run(args), RUN_LIMIT_S))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    print(f"\nJSON: {args.output}")
    return 0
