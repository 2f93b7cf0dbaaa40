"""Experiments behind BENCHMARKS.md's findings: what limits the webhook ack rate and what
dominates the added latency, measured by changing imagebot only from the outside (its config,
its environment, and bench.research.instrumented's what-ifs). Not part of `python -m bench`.

    python -m bench.research.experiments list
    python -m bench.research.experiments ack   [--variants default,gil-5ms] [--rates 100,150,200]
                                      [--repeat 2] [--seconds 3]
    python -m bench.research.experiments added [--variants default,budget-1000] [--rate 10]
                                               [--repeat 1]
    python -m bench.research.experiments flood [--variants default,settle-bg] [--repeat 1]
    python -m bench.research.experiments cpu   [--variants default,gc-freeze] [--hz 0,250,500]

Variants combine with '+' (`gc-freeze+gil-5ms`). Every variant x rate x repetition is a
freshly started bot on a fresh database against reset fakes, as in the reports; the order is
interleaved (rate, repetition, then variant) so that drift on the machine spreads over all
variants. The `instrumented` variant runs with bench.research.instrumented's counters and
matches each slow acknowledgement with what happened meanwhile (GC pauses, loop stalls, the
save's queue wait and hand-back). Prints a table and writes bench/results/experiments-<kind>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.procs import Fakes
from bench.run import RESULTS_DIR, machine
from bench.scenarios import Context
from bench.stats import percentile
from tests.support import deep_merge

RUN_LIMIT_S = 1800
SLOW_S = 0.050  # an acknowledgement slower than this is "slow" for the matching


@dataclass(frozen=True)
class Variant:
    """A change made from the outside: config overrides, environment, a what-if."""

    doc: str
    overrides: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    what_if: tuple[str, ...] = ()
    counters: bool = False


def _gil(seconds: float) -> Variant:
    return Variant(
        f"sys.setswitchinterval({seconds:g})", env={"IMAGEBOT_GIL_SWITCH_S": str(seconds)}
    )


def _gc(*thresholds: int) -> Variant:
    value = ",".join(str(t) for t in thresholds)
    return Variant(f"gc.set_threshold({value})", env={"IMAGEBOT_GC_THRESHOLDS": value})


def _budget(per_s: float) -> Variant:
    limit = {"max_requests_per_s": per_s}
    return Variant(
        f"provider budget {per_s:g} req/s", overrides={"replicate": limit, "fal": limit}
    )


def _poll(seconds: float) -> Variant:
    poll = {"poll_interval_s": seconds}
    return Variant(f"poll interval {seconds:g} s", overrides={"replicate": poll, "fal": poll})


VARIANTS: dict[str, Variant] = {
    "default": Variant("imagebot as configured by the benchmark"),
    "instrumented": Variant("default + bench.research.instrumented's counters", counters=True),
    "gil-5ms": _gil(0.005),
    "gil-2ms": _gil(0.002),
    "gil-1ms": _gil(0.001),
    "gil-0.2ms": _gil(0.0002),
    "gil-0.1ms": _gil(0.0001),
    "gc-freeze": Variant("gc.freeze() once ready", what_if=("gc-freeze",)),
    "gc-cpython": _gc(700, 10, 10),
    "gc-thr": _gc(20000, 20, 20),
    "gc-off": Variant("gc.disable() once ready", what_if=("gc-off",)),
    "sync-normal": Variant(
        'storage.synchronous = "normal"', overrides={"storage": {"synchronous": "normal"}}
    ),
    "running-20": Variant("runner.max_running = 20", overrides={"runner": {"max_running": 20}}),
    "budget-1000": _budget(1000),
    "poll-0.1": _poll(0.1),
    "poll-0.05": _poll(0.05),
    "poll-0.5": _poll(0.5),
    "settle-bg": Variant(
        "a job's slot is freed before its status deletion", what_if=("settle-in-background",)
    ),
    "no-queued-edit": Variant(
        "no 'queued, place n' edit from the handler", what_if=("no-queued-edit",)
    ),
    "deletes-not-low": Variant(
        "deleteMessage outside the 30% progress share", what_if=("deletes-not-low",)
    ),
    "deletes-free": Variant("deleteMessage not rate limited", what_if=("deletes-free",)),
}


def resolve(name: str) -> Variant:
    """A variant by name; `a+b` merges a and b."""
    parts = [VARIANTS[p] for p in name.split("+")]
    merged = Variant(" + ".join(p.doc for p in parts))
    overrides: dict[str, Any] = {}
    env: dict[str, str] = {}
    what_if: tuple[str, ...] = ()
    for part in parts:
        overrides = deep_merge(overrides, part.overrides)
        env.update(part.env)
        what_if += part.what_if
    return Variant(merged.doc, overrides, env, what_if, counters=any(p.counters for p in parts))


def _launch(variant: Variant, counters_out: Path) -> tuple[str, dict[str, str]]:
    """The module to run and the extra environment for a variant."""
    if not variant.what_if and not variant.counters:
        return "imagebot", dict(variant.env)
    env = dict(variant.env)
    env["BENCH_WHAT_IF"] = ",".join(variant.what_if)
    env["BENCH_INSTRUMENT"] = "on" if variant.counters else "off"
    if variant.counters:
        env["BENCH_INSTRUMENT_OUT"] = str(counters_out)
    return "bench.research.instrumented", env


# -- ack ---------------------------------------------------------------------------------------


def _overlaps(start: float, end: float, events: list[tuple[float, float]]) -> bool:
    return any(e_start < end and e_end > start for e_start, e_end in events)


def match_slow(records: list[dict[str, Any]], data: dict[str, Any]) -> dict[str, Any]:
    """For the slow acknowledgements: what overlapped them (GC, loop stalls, slow saves)."""
    ev = data["events"]
    gc2 = [(w - p / 1000, w) for g, w, p, _, _ in ev["gc"] if g == 2]
    gc01 = [(w - p / 1000, w) for g, w, p, _, _ in ev["gc"] if g < 2 and p >= 2]
    intake = [(w - lag / 1000, w) for n, w, lag in ev["stalls"] if n != "MainThread" and lag >= 20]
    main = [(w - lag / 1000, w) for n, w, lag in ev["stalls"] if n == "MainThread" and lag >= 20]
    slow_saves = [
        (w, w + (wait + run + back) / 1000)
        for w, wait, run, back, _ in ev["saves"]
        if wait + run + back >= 20
    ]
    slow = [r for r in records if r["status"] == 200 and r["latency_s"] >= SLOW_S]
    counts = dict.fromkeys(
        ("gc gen2", "gc gen0/1 >= 2 ms", "intake loop stall >= 20 ms", "slow save >= 20 ms"), 0
    )
    counts["main loop stall >= 20 ms"] = 0
    counts["none of these"] = 0
    for r in slow:
        start = r["wall_sent"] - (r["latency_s"] - r["service_s"])  # from its scheduled time
        end = r["wall_sent"] + r["service_s"]
        hits = {
            "gc gen2": _overlaps(start, end, gc2),
            "gc gen0/1 >= 2 ms": _overlaps(start, end, gc01),
            "intake loop stall >= 20 ms": _overlaps(start, end, intake),
            "slow save >= 20 ms": _overlaps(start, end, slow_saves),
            "main loop stall >= 20 ms": _overlaps(start, end, main),
        }
        for key, hit in hits.items():
            counts[key] += int(hit)
        if not any(hits.values()):
            counts["none of these"] += 1
    saves = ev["saves"]
    return {
        "slow_acks": len(slow),
        "slow_acks_overlapping": counts,
        "save_wait_p50_p99_ms": _p50_p99([s[1] for s in saves]),
        "save_run_p50_p99_ms": _p50_p99([s[2] for s in saves]),
        "save_hand_back_p50_p99_ms": _p50_p99([s[3] for s in saves]),
        "save_queue_depth_p99": percentile([float(s[4]) for s in saves], 99),
        "gc": data["gc"],
        "loops": data["loops"],
        "thread_cpu_s": data["thread_cpu_s"],
        "webhook_route": data["webhook_route"],
        "writer_busy_s": data["writer"]["run_total_s"],
        "writer_sites": {
            site: {
                "n": fig["n"],
                "wait_p50_p99_ms": [fig["wait"]["p50_ms"], fig["wait"]["p99_ms"]],
                "run_p50_p99_ms": [fig["run"]["p50_ms"], fig["run"]["p99_ms"]],
                "run_total_s": fig["run"]["total_s"],
            }
            for site, fig in data["writer"]["sites"].items()
        },
        "wall": data["wall"],
    }


def _p50_p99(values: list[float]) -> list[float | None]:
    return [percentile(values, 50), percentile(values, 99)]


async def ack_once(ctx: Context, name: str, rate: float, seconds: float) -> dict[str, Any]:
    """One bot, one fixed-rate load of /generate: the ack figures (and counters)."""
    variant = resolve(name)
    out_path = ctx.workdir / f"counters-{name}-{rate:g}-{time.monotonic_ns()}.json"
    module, env = _launch(variant, out_path)
    count = int(rate * seconds)
    async with ctx.imagebot(
        f"x-{name}-{rate:g}", variant.overrides, module=module, extra_env=env
    ) as bot:
        result, cpu = await scenarios._load_with_cpu(ctx, bot, ctx.spec(bot, rate, count))
    fig = scenarios._ack_figures(result)
    row: dict[str, Any] = {
        "variant": name,
        "rate": rate,
        "verdict": scenarios._judge(fig),
        **{k: fig[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "errors")},
        "client_lag_p99_ms": fig["client_lag_p99_ms"],
        "cpu_ms_per_update": round(cpu / max(1, count) * 1000, 2),
        "cores": result["cores"],
    }
    if variant.counters and out_path.exists():
        row["matched"] = match_slow(result["records"], json.loads(out_path.read_text()))
    return row


def _ack_table(rows: list[dict[str, Any]]) -> str:
    lines = ["variant            rate  runs  p50 ms (each)      p99 ms (each)          pass"]
    keys = sorted({(r["variant"], r["rate"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for variant, rate in keys:
        runs = [r for r in rows if r["variant"] == variant and r["rate"] == rate]
        p50 = "/".join(str(r["p50_ms"]) for r in runs)
        p99 = "/".join(str(r["p99_ms"]) for r in runs)
        passed = sum(r["verdict"] == "pass" for r in runs)
        lines.append(
            f"{variant:<18} {rate:>4g}  {len(runs):>4}  {p50:<18} {p99:<22} {passed}/{len(runs)}"
        )
    return "\n".join(lines)


# -- added latency -----------------------------------------------------------------------------


async def added_once(ctx: Context, name: str, rate: float) -> dict[str, Any]:
    variant = resolve(name)
    module, env = _launch(variant, ctx.workdir / "unused.json")
    poll = 0.25
    for part in name.split("+"):
        if part.startswith("poll-"):
            poll = float(part.removeprefix("poll-"))
    overrides = deep_merge(variant.overrides, {})
    figures = await scenarios._added_latency(
        ctx, poll, rate, overrides=overrides, module=module, extra_env=env, label=name
    )
    figures["variant"] = name
    return figures


def _added_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "variant                    rate  kind      x p50/p99 ms    poll delay p50  after poll "
        "p50  polls/job  CPU ms/job"
    ]
    for r in rows:
        for kind in ("generate", "edit"):
            f = r[kind]
            lines.append(
                f"{r['variant']:<26} {r['rate_per_kind']:>4g}  {kind:<8}  "
                f"{f['p50_ms']}/{f['p99_ms']:<10}  {f['poll_delay']['p50_ms']!s:<14}  "
                f"{f['after_poll']['p50_ms']!s:<15}  {f['polls_per_job']!s:<9}  "
                f"{r['cpu_ms_per_job']}"
            )
    return "\n".join(lines)


# -- flood -------------------------------------------------------------------------------------


async def flood_once(ctx: Context, name: str) -> dict[str, Any]:
    variant = resolve(name)
    module, env = _launch(variant, ctx.workdir / "unused.json")
    fig = await scenarios.report_flood(ctx, extra=variant.overrides, module=module, extra_env=env)
    fig.pop("telegram_429_causes", None)
    fig["variant"] = name
    return fig


def _flood_table(rows: list[dict[str, Any]]) -> str:
    lines = ["variant              429s  lost  drain s  photos by s (25/50/75/100%)  calls"]
    for r in rows:
        quart = "/".join(str(v) for v in r["photos_arrived_by_s"].values())
        calls = ", ".join(
            f"{op} {t['n']} (last {t['last_s']} s)" for op, t in r["timeline"].items()
        )
        lines.append(
            f"{r['variant']:<20} {r['telegram_429s']:>4}  {r['lost']:>4}  {r['drain_s']:>7}  "
            f"{quart:<28} {calls}"
        )
    return "\n".join(lines)


# -- CPU per job -------------------------------------------------------------------------------


async def cpu_once(ctx: Context, name: str, rate_hz: int) -> dict[str, Any]:
    variant = resolve(name)
    if variant.overrides:
        raise SystemExit("the cpu experiment takes environment/what-if variants only")
    module, env = _launch(variant, ctx.workdir / "unused.json")
    raw = ctx.workdir / f"cpu-{name}-{rate_hz}.collapsed.txt"
    fig = await scenarios.end_to_end(
        ctx, rate_hz=rate_hz, raw=raw, label=f"cpu-{name}", module=module, extra_env=env
    )
    fig["variant"] = name
    return fig


def _cpu_table(rows: list[dict[str, Any]]) -> str:
    lines = ["variant              py-spy Hz  jobs  CPU ms/job  by thread"]
    for r in rows:
        threads = ", ".join(f"{k} {v}" for k, v in list(r["cpu_ms_per_job_by_thread"].items())[:4])
        lines.append(
            f"{r['variant']:<20} {r['py_spy_hz']:>9}  {r['delivered']:>4}  "
            f"{r['cpu_ms_per_job']:>10}  {threads}"
        )
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [n for n in args.variants.split(",") if n]
    for n in names:
        resolve(n)  # unknown names fail before anything starts
    workdir = Path(tempfile.mkdtemp(prefix="imagebot-experiments-"))
    fakes = await Fakes.start()
    ctx = Context(fakes, workdir)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        if args.kind == "ack":
            rates = [float(r) for r in args.rates.split(",")]
            for rate in rates:
                for rep in range(args.repeat):
                    for name in names:
                        row = await ack_once(ctx, name, rate, args.seconds)
                        row["repetition"] = rep
                        rows.append(row)
                        print(
                            f"[exp] {name} {rate:g}/s: p50 {row['p50_ms']} p99 {row['p99_ms']} "
                            f"{row['verdict']} cores {row['cores']}",
                            file=sys.stderr,
                            flush=True,
                        )
        elif args.kind == "cpu":
            for rep in range(args.repeat):
                for name in names:
                    for hz in (int(h) for h in args.hz.split(",")):
                        row = await cpu_once(ctx, name, hz)
                        row["repetition"] = rep
                        rows.append(row)
                        print(
                            f"[exp] {name} py-spy {hz} Hz: {row['cpu_ms_per_job']} ms/job",
                            file=sys.stderr,
                            flush=True,
                        )
        elif args.kind == "flood":
            for rep in range(args.repeat):
                for name in names:
                    row = await flood_once(ctx, name)
                    row["repetition"] = rep
                    rows.append(row)
                    print(f"[exp] {name}: drain {row['drain_s']} s", file=sys.stderr, flush=True)
        else:
            for rep in range(args.repeat):
                for name in names:
                    row = await added_once(ctx, name, args.rate)
                    row["repetition"] = rep
                    rows.append(row)
                    print(f"[exp] {name}: done", file=sys.stderr, flush=True)
    finally:
        await fakes.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": machine(),
        "kind": args.kind,
        "variants": {n: resolve(n).doc for n in names},
        "rows": rows,
        "duration_s": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Parse, run the experiment, print its table, write its JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.research.experiments", description=__doc__
    )
    parser.add_argument("kind", choices=["ack", "added", "flood", "cpu", "list"])
    parser.add_argument("--variants", default="default")
    parser.add_argument("--rates", default="100,150,200,300", help="ack: updates/s")
    parser.add_argument("--seconds", type=float, default=3.0, help="ack: load per run")
    parser.add_argument("--rate", type=float, default=10.0, help="added: jobs/s of each kind")
    parser.add_argument("--hz", default="0,250", help="cpu: py-spy rates (0: no profiler)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.kind == "list":
        for name, variant in VARIANTS.items():
            print(f"{name:<14} {variant.doc}")
        return 0
    results = asyncio.run(asyncio.wait_for(run(args), RUN_LIMIT_S))
    out = args.output or RESULTS_DIR / f"experiments-{args.kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    tables = {"ack": _ack_table, "added": _added_table, "flood": _flood_table, "cpu": _cpu_table}
    print(tables[args.kind](results["rows"]))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
