"""The operator's side: /jobs (pages, filters, no secrets), bearer auth, /healthz, and the
README's promises (sqlite3 recipes, backups, the config table, the two set-up commands)."""

from __future__ import annotations

import asyncio
import re
import shutil
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import BaseModel

from imagebot import __version__
from imagebot.clock import iso
from imagebot.config import Settings
from tests import updates
from tests.conftest import BOT_TOKEN, FAL_KEY, REPLICATE_TOKEN, WEBHOOK_SECRET
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.images import make_image
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram
from tests.storeview import execute, is_pg, query
from tests.support import db_path, rows

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OPS_TOKEN = "ops-token-0123456789"
SECRETS = (BOT_TOKEN, REPLICATE_TOKEN, FAL_KEY, WEBHOOK_SECRET, OPS_TOKEN)
ALICE, BOB = updates.DEFAULT_USER_ID, 2002


async def ops_get(
    app: Any, path: str, token: str | None = None, auth: str | None = None
) -> tuple[int, Any, str]:
    """GET an ops path; returns (status, parsed JSON or None, raw text)."""
    headers = {"Authorization": auth or f"Bearer {token}"} if (token or auth) else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.ops.port}{path}", headers=headers) as resp,
    ):
        text = await resp.text()
        is_json = resp.content_type == "application/json"
        return resp.status, (await resp.json() if is_json else None), text


async def five_jobs(
    app: Any, telegram: FakeTelegram, replicate: FakeReplicate, fal: FakeFal
) -> None:
    """One after the other: three generations by Alice, a refused one by Bob, an edit by Alice."""
    steps: list[tuple[dict[str, Any], Callable[[], bool]]] = []
    for n, prompt in enumerate(("one", "two", "three"), start=1):
        steps.append(
            (updates.command(f"/generate {prompt}"), lambda n=n: len(telegram.photos(ALICE)) == n)
        )
    steps.append(
        (
            updates.command("/generate spicy", user_id=BOB, chat_id=BOB),
            lambda: any("failed" in t for t in telegram.texts(BOB)),
        )
    )
    photo = telegram.add_file(make_image(64, 48))
    steps.append(
        (
            updates.photo_message(photo, caption="/edit make it blue", width=64, height=48),
            lambda: len(telegram.photos(ALICE)) == 4,
        )
    )
    for number, (update, done) in enumerate(steps, start=1):
        if number == 4:
            replicate.next_behaviours.append({"outcome": "failed"})
        telegram.push_update(update)
        await wait_until(done)
        await wait_until(lambda: app.services.runner.running_count == 0)


async def test_jobs_pages_walk_and_filters(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, fal: FakeFal
) -> None:
    """/jobs is newest first; `limit` + `before`/`next_before` walk all five jobs in three pages
    without gaps or repeats; status, kind, user_id, chat_id and since filter (also together and
    across pages); bad parameters are 400 with a reason; the page size is capped."""
    async with bot(ops={"jobs_page_max": 3}) as app:
        await five_jobs(app, telegram, replicate, fal)
        pages: list[list[int]] = []
        cursor = ""
        while True:
            status, page, _ = await ops_get(app, f"/jobs?limit=2{cursor}")
            assert status == 200
            pages.append([job["id"] for job in page["jobs"]])
            if page["next_before"] is None:
                break
            assert page["next_before"] == page["jobs"][-1]["id"]
            cursor = f"&before={page['next_before']}"
            assert len(pages) < 10
        _, failed, _ = await ops_get(app, "/jobs?status=failed")
        _, edits, _ = await ops_get(app, "/jobs?kind=edit")
        _, bobs, _ = await ops_get(app, f"/jobs?user_id={BOB}")
        _, bob_chat, _ = await ops_get(app, f"/jobs?chat_id={BOB}")
        _, third, _ = await ops_get(app, "/jobs/3")
        since = third["created_at"]
        _, recent, _ = await ops_get(app, f"/jobs?since={since}")
        _, future, _ = await ops_get(app, "/jobs?since=2999-01-01T00:00:00Z")
        _, naive, _ = await ops_get(app, f"/jobs?since={since.removesuffix('Z')}")
        _, offset, _ = await ops_get(app, f"/jobs?since={since.removesuffix('Z')}%2B01:00")
        _, alice_gen, _ = await ops_get(
            app, f"/jobs?status=succeeded&kind=generate&user_id={ALICE}"
        )
        _, ok_1, _ = await ops_get(app, "/jobs?status=succeeded&limit=2")
        _, ok_2, _ = await ops_get(
            app, f"/jobs?status=succeeded&limit=2&before={ok_1['next_before']}"
        )
        _, capped, _ = await ops_get(app, "/jobs?limit=1000")
        bad = [
            (await ops_get(app, query))[:2]
            for query in (
                "/jobs?status=weird",
                "/jobs?kind=paint",
                "/jobs?since=yesterday",
                "/jobs?limit=0",
                "/jobs?before=abc",
                "/jobs?user_id=alice",
            )
        ]

    assert pages == [[5, 4], [3, 2], [1]]
    assert [j["id"] for j in failed["jobs"]] == [4] and failed["jobs"][0]["user_id"] == BOB
    assert [(j["id"], j["kind"], j["provider"]) for j in edits["jobs"]] == [(5, "edit", "fal")]
    assert [j["id"] for j in bobs["jobs"]] == [4] == [j["id"] for j in bob_chat["jobs"]]
    assert [j["id"] for j in recent["jobs"]] == [5, 4, 3]
    assert future == {"jobs": [], "count": 0, "next_before": None}
    assert naive == recent  # no offset: UTC
    assert recent["next_before"] is None
    # +01:00 is an hour earlier in UTC: all five match, so a second page exists.
    assert [j["id"] for j in offset["jobs"]] == [5, 4, 3] and offset["next_before"] == 3

    assert [j["id"] for j in alice_gen["jobs"]] == [3, 2, 1]
    # Four succeeded jobs in pages of two: the second page is the last, exactly.
    assert [j["id"] for j in ok_1["jobs"]] == [5, 3] and ok_1["next_before"] == 3
    assert [j["id"] for j in ok_2["jobs"]] == [2, 1] and ok_2["next_before"] is None
    assert capped["count"] == 3 and capped["next_before"] == 3  # ops.jobs_page_max
    for status, body in bad:
        assert status == 400 and body["error"], body


async def test_job_detail_and_unknown_ids(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """/jobs/{id} shows one job with what an operator needs; unknown ids are 404, junk 400."""
    async with bot() as app:
        telegram.push_update(updates.command("/generate a red fox"))
        await wait_until(lambda: len(telegram.photos(ALICE)) == 1)
        await wait_until(lambda: app.services.runner.running_count == 0)
        status, job, _ = await ops_get(app, "/jobs/1")
        missing = (await ops_get(app, "/jobs/999"))[:2]
        junk = (await ops_get(app, "/jobs/abc"))[0]
    assert status == 200
    assert job["status"] == "succeeded" and job["kind"] == "generate" and job["phase"] == "done"
    assert job["provider"] == "replicate"
    assert job["provider_request_id"] == replicate.last_prediction.id
    assert job["cost_estimate_usd"] == 0.003 and job["attempts"] == 1
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert missing == (404, {"error": "no such job"})
    assert junk == 400


async def test_jobs_never_show_a_secret(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Even when a vendor's error text echoes the API token and a Telegram file URL, neither
    /jobs nor /jobs/{id} contains any secret (nor the secret half of an id:secret pair)."""
    replicate.next_behaviours.append(
        {
            "outcome": "failed",
            "error_text": (
                f"auth {REPLICATE_TOKEN} rejected for "
                f"https://api.telegram.org/file/bot{BOT_TOKEN}/photos/x.jpg key {FAL_KEY}"
            ),
        }
    )
    async with bot(IMAGEBOT_OPS_TOKEN=OPS_TOKEN) as app:
        telegram.push_update(updates.command("/generate leaky"))
        await wait_until(lambda: any("failed" in t for t in telegram.texts(ALICE)))
        await wait_until(lambda: app.services.runner.running_count == 0)
        _, listing, list_text = await ops_get(app, "/jobs", OPS_TOKEN)
        _, job, job_text = await ops_get(app, "/jobs/1", OPS_TOKEN)
    assert listing["count"] == 1 and job["status"] == "failed"
    assert "rejected for https://api.telegram.org/file/bot" in job["error_message"]
    for text in (list_text, job_text):
        for secret in SECRETS:
            assert secret not in text
            assert secret.split(":")[-1] not in text


async def test_bearer_token_guards_jobs_and_metrics_but_not_healthz(
    bot, telegram: FakeTelegram
) -> None:
    """With IMAGEBOT_OPS_TOKEN set, /jobs, /jobs/{id} and /metrics answer 401 without the
    right `Authorization: Bearer` header (and never echo the token); /healthz stays open."""
    async with bot(IMAGEBOT_OPS_TOKEN=OPS_TOKEN) as app:
        results: dict[str, list[int]] = {}
        for path in ("/jobs", "/jobs/1", "/metrics", "/healthz", "/healthz/live"):
            results[path] = [
                (await ops_get(app, path))[0],
                (await ops_get(app, path, "wrong-token"))[0],
                (await ops_get(app, path, auth=OPS_TOKEN))[0],  # no "Bearer "
                (await ops_get(app, path, auth=f"Basic {OPS_TOKEN}"))[0],
                (await ops_get(app, path, OPS_TOKEN))[0],
            ]
        _, body, text = await ops_get(app, "/jobs", "wrong-token")
    assert results["/jobs"] == [401, 401, 401, 401, 200]
    assert results["/jobs/1"] == [401, 401, 401, 401, 404]
    assert results["/metrics"] == [401, 401, 401, 401, 200]
    assert results["/healthz"] == [200] * 5
    assert results["/healthz/live"] == [200] * 5
    assert body == {"error": "unauthorized"} and OPS_TOKEN not in text


async def test_without_a_token_loopback_ops_is_open(bot) -> None:
    """On the default loopback listener without a token, /jobs and /metrics need no header."""
    async with bot() as app:
        assert (await ops_get(app, "/jobs"))[0] == 200
        assert (await ops_get(app, "/metrics"))[0] == 200


async def test_healthz_ready_live_and_not_ready(bot, telegram: FakeTelegram) -> None:
    """/healthz is 200 with the version and every check true while the bot takes updates; when
    the intake stops it turns 503 naming the failed check, while /healthz/live stays 200."""
    async with bot() as app:
        ready_status, ready, _ = await ops_get(app, "/healthz")
        live_status, live, _ = await ops_get(app, "/healthz/live")
        await app.services.intake.stop()  # e.g. Telegram rejected the token mid-run
        down_status, down, _ = await ops_get(app, "/healthz")
        still_live, _, _ = await ops_get(app, "/healthz/live")
    assert ready_status == 200
    assert ready["status"] == "ok" and ready["ready"] is True and ready["live"] is True
    assert ready["version"] == __version__ and ready["mode"] == "polling"
    assert ready["checks"] == {
        "database": True,
        "database_writes": True,
        "intake": True,
        "event_loop": True,
    }
    assert ready["queued"] == 0 and ready["running"] == 0
    assert (live_status, live) == (200, {"live": True, "version": __version__})
    assert down_status == 503
    assert down["ready"] is False and down["status"] == "unavailable"
    assert down["checks"] == {
        "database": True,
        "database_writes": True,
        "intake": False,
        "event_loop": True,
    }
    assert still_live == 200


async def test_healthz_is_not_ready_when_the_database_is_gone(bot) -> None:
    """A database that cannot be queried makes /healthz 503 with database: false."""
    async with bot() as app:
        await app.services.db.close()
        status, body, _ = await ops_get(app, "/healthz")
        await app.services.db.open()  # so the bot can shut down cleanly
    assert status == 503
    assert body["checks"]["database"] is False and "queued" not in body


# -- the README's promises ---------------------------------------------------------------


def readme_sql() -> dict[str, str]:
    """The README's ```sql recipes, keyed by their first comment line."""
    recipes: dict[str, str] = {}
    for block in re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S):
        first, _, _ = block.partition("\n")
        assert first.startswith("-- "), block
        recipes[first.removeprefix("-- ").strip()] = block
    return recipes


def psql_rewrites() -> list[tuple[str, str]]:
    """The README's sqlite3 -> psql table as (regex, replacement) pairs (N: any number)."""
    section = README.read_text().split("| in `sqlite3` | in `psql` |", 1)[1].split("\n\n", 1)[0]
    pairs = []
    for lite, post in re.findall(r"^\| `(.+?)` \| `(.+?)` \|$", section, re.M):
        pattern = re.escape(lite).replace("N", r"(\d+)")
        pairs.append((pattern, post.replace("\\", "\\\\").replace("N", r"\1")))
    return pairs


def as_psql(sql: str) -> str:
    for pattern, replacement in psql_rewrites():
        sql = re.sub(pattern, replacement, sql)
    return sql


async def test_readme_sqlite_recipes_run_against_a_real_database(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, fal: FakeFal, tmp_path: Path
) -> None:
    """Every sqlite3 recipe in the README runs on a database the bot wrote and answers its
    question: today's jobs by status, a user's failures, cost per day, stuck jobs, failure
    reasons, unprocessed updates (on PostgreSQL: rewritten by the README's psql table)."""
    async with bot() as app:
        await five_jobs(app, telegram, replicate, fal)
    database = db_path(app)
    # A job stuck for an hour: queued by a bot that has been down since.
    execute(
        database,
        "UPDATE jobs SET status = 'queued', phase = 'new', finished_at = NULL,"
        " created_at = ? WHERE id = 2",
        (iso(datetime.now(UTC) - timedelta(hours=1)),),
    )
    recipes = readme_sql()
    answers: dict[str, list[tuple[Any, ...]]] = {}
    target = database
    if is_pg(database):
        assert len(psql_rewrites()) >= 6
        target = f"{database}?options=-c%20TimeZone%3DUTC"  # the README's SET TIME ZONE 'UTC'
    for title, sql in recipes.items():
        sql = sql.replace("123456789", str(BOB))
        if is_pg(database):
            sql = as_psql(sql)
        answers[title] = [tuple(row) for row in query(target, sql)]

    def answer(words: str) -> list[tuple[Any, ...]]:
        (title,) = [t for t in answers if words in t.lower()]
        return answers[title]

    assert len(recipes) >= 5
    today = datetime.now(UTC).date().isoformat()
    created = {row["id"]: row["created_at"] for row in rows(database)}
    by_status = [("failed", 1), ("succeeded", 3)]
    if created[2] >= today:  # the stuck job is from today unless the test runs near midnight
        by_status.insert(1, ("queued", 1))
    assert sorted(answer("today's jobs by status")) == by_status
    (failure,) = answer("failures")
    assert failure[0] == 4 and "safety" in failure
    cost = {row[1]: row[2:] for row in answer("cost per day")}
    assert cost["replicate"] == (2, 0.006) and cost["fal"] == (1, 0.039)
    (stuck,) = answer("stuck")
    assert stuck[0] == 2 and stuck[1] == "queued"
    assert answer("failure reasons") == [("safety", 1)]
    assert answer("not processed") == []


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 command is not installed")
@pytest.mark.sqlite_only(reason="sqlite3's .backup and VACUUM INTO copy a SQLite file")
async def test_readme_backups_work_while_the_bot_runs(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, tmp_path: Path
) -> None:
    """`sqlite3 imagebot.db ".backup ..."` and `VACUUM INTO` (the README's backups) make
    complete, consistent copies while the bot is running."""
    text = README.read_text()
    assert ".backup" in text and "VACUUM INTO" in text
    async with bot() as app:
        telegram.push_update(updates.command("/generate a red fox"))
        await wait_until(lambda: len(telegram.photos(ALICE)) == 1)
        await wait_until(lambda: app.services.runner.running_count == 0)
        backup, vacuumed = tmp_path / "backup.db", tmp_path / "vacuumed.db"
        for command in (f".backup '{backup}'", f"VACUUM INTO '{vacuumed}'"):
            process = await asyncio.create_subprocess_exec(
                "sqlite3",
                db_path(app),
                command,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(process.communicate(), 30)
            assert process.returncode == 0, err.decode()
    for copy in (backup, vacuumed):
        (job,) = rows(str(copy))
        assert job["status"] == "succeeded"
        assert rows(str(copy), "PRAGMA integrity_check")[0][0] == "ok"


async def test_readme_pg_dump_backup_works_while_the_bot_runs(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, tmp_path: Path, pg_cluster: Any
) -> None:
    """On PostgreSQL the README's backup, `pg_dump --format=custom` taken while the bot runs,
    restores with `pg_restore --no-owner` into an empty database that holds the same jobs and
    schema version."""
    text = README.read_text()
    assert "pg_dump --format=custom" in text and "pg_restore --dbname" in text
    source = pg_cluster.create_db()
    dump_file = tmp_path / "imagebot.dump"

    async def run(*argv: str) -> None:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err.decode()

    try:
        async with bot(storage={"database": source}) as app:
            telegram.push_update(updates.command("/generate a red fox"))
            await wait_until(lambda: len(telegram.photos(ALICE)) == 1)
            await wait_until(lambda: app.services.runner.running_count == 0)
            replicate.latency_s = 3  # a second job is in flight while the dump is taken
            telegram.push_update(updates.command("/generate a slow fox"))
            await wait_until(lambda: len(rows(source)) == 2)
            dump_bin = str(pg_cluster.bin_dir / "pg_dump")
            await run(dump_bin, "--format=custom", f"--file={dump_file}", source)
            await wait_until(lambda: len(telegram.photos(ALICE)) == 2, within=15)
        copy = pg_cluster.create_db()
        try:
            restore_bin = str(pg_cluster.bin_dir / "pg_restore")
            await run(restore_bin, f"--dbname={copy}", "--no-owner", str(dump_file))
            restored = [(r["prompt"], r["status"]) for r in rows(copy)]
            migrations = "SELECT name FROM schema_migrations ORDER BY name"
            assert query(copy, migrations) == query(source, migrations)
        finally:
            pg_cluster.drop_db(copy)
    finally:
        pg_cluster.drop_db(source)
    assert restored[0] == ("a red fox", "succeeded")
    assert restored[1][0] == "a slow fox" and restored[1][1] in ("queued", "running")


def readme_config_table() -> dict[str, str]:
    """`key` -> `default` from the README's configuration table."""
    return dict(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| `(.*?)` \|", README.read_text(), re.M))


def setting_defaults() -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for name, sub in model.model_fields.items():
                defaults[f"{section}.{name}"] = sub.get_default(call_default_factory=True)
    return defaults


def test_readme_config_table_lists_every_key_with_its_default() -> None:
    """The README's table has one row per setting in imagebot/config.py, and each default
    written there (as TOML) is the code's default (paths: "" means the computed default)."""
    table = readme_config_table()
    defaults = setting_defaults()
    assert sorted(table) == sorted(defaults)
    for key, written in table.items():
        value = tomllib.loads(f"v = {written}")["v"]
        expected = defaults[key]
        if expected is None or isinstance(expected, Path):
            assert value == "", key  # TOML has no null: "" stands for unset
        else:
            assert value == expected, key


def test_readme_states_the_two_commands_and_ci_runs_the_test_one() -> None:
    """The README shows exactly the two set-up commands; .ci/run's first command is the
    README's test command, word for word; then it installs PostgreSQL's binaries if they are
    missing (the README names that package as the way to enable the PostgreSQL half) and runs
    the suite again with PostgreSQL as the bot's store."""
    start = (
        "python3 -m venv .venv && .venv/bin/pip install . && TELEGRAM_BOT_TOKEN=<token> "
        "REPLICATE_API_TOKEN=<r8_…> FAL_KEY=<key> .venv/bin/imagebot --polling"
    )
    test = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && .venv/bin/pytest"
    text = README.read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", quick_start, flags=re.S)
    assert [block.strip() for block in blocks] == [start, test]
    assert test in text.split("## Development", 1)[1]
    commands = [
        line
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line.strip()
        and not line.lstrip().startswith("#")
        and line.split()[0] not in {"set", "cd"}
    ]
    assert commands[0] == test
    second = ".venv/bin/pytest --store postgresql"
    second_line = next(line for line in commands if line.startswith(second))
    assert [line for line in commands if "pytest" in line][:2] == [test, second_line]
    before = commands[: commands.index(second_line)]
    assert any("apt-get install" in line and "postgresql" in line for line in before)
    assert "apt-get install -y postgresql" in quick_start


def test_readme_lists_every_metric_and_they_exist() -> None:
    """Every imagebot_* series the README names exists, and every series exported is named."""
    from prometheus_client.parser import text_string_to_metric_families

    from imagebot.metrics import Metrics

    exported = {f.name for f in text_string_to_metric_families(Metrics().render().decode())}
    ours = {name for name in exported if name.startswith("imagebot_")}
    named = set(
        re.findall(r"`(imagebot_[a-z0-9_]+?)(?:_total|_bucket|_count|_sum)?`", README.read_text())
    )
    assert named == ours
