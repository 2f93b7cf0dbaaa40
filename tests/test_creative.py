"""Styles, shapes, image counts, 🎨 Remix, withheld images, safety refusals and spoilers,
through the real bot and the vendor fakes (issue 17): what the user sees, what the vendor was
asked, what the database holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imagebot import texts
from imagebot.cli import main
from imagebot.config import load_settings
from imagebot.errors import ConfigError
from tests import updates
from tests.conftest import BOT_TOKEN, FAL_KEY, REPLICATE_TOKEN
from tests.fakes.base import wait_until
from tests.fakes.fal_api import FakeFal
from tests.fakes.replicate_api import FakeReplicate
from tests.fakes.telegram_api import FakeTelegram, SentMessage
from tests.support import answer, button_data, db_path, press, rows

CHAT = USER = updates.DEFAULT_CHAT_ID
BOB = 2002
VERSION = "a" * 64
LORA_MODEL = "black-forest-labs/flux-dev-lora"
STYLES: list[dict[str, Any]] = [
    {
        "id": "photo",
        "name": "📷 Photo",
        "model": LORA_MODEL,
        "prompt_suffix": ", natural light",
        "params": {"lora_weights": "someone/film-lora", "lora_scale": 5.0},  # clamped to 3
    },
    {"id": "sketch", "name": "✏️ Sketch", "model": f"someone/sketcher:{VERSION}"},
]


def menu(telegram: FakeTelegram, starts: str) -> SentMessage:
    """The newest bot text message starting with `starts` (a /style or /settings menu)."""
    found = [m for m in telegram.messages(CHAT) if m.kind == "text" and (m.text or "")]
    return [m for m in found if (m.text or "").startswith(starts)][-1]


def results_keyboard(telegram: FakeTelegram) -> SentMessage:
    """The newest message carrying a result's buttons (the photo, or the album's button line)."""
    return [m for m in telegram.messages(CHAT) if "r:" in "".join(button_data(m))][-1]


async def jobs_done(app: Any, n: int) -> None:
    await wait_until(
        lambda: (
            len(rows(db_path(app))) >= n
            and all(r["status"] in ("succeeded", "failed") for r in rows(db_path(app)))
        ),
        within=15,
    )


# -- configuration ---------------------------------------------------------------------------


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[[styles]]\nid = "a"\nname = "A"\n[[styles]]\nid = "a"\nname = "B"\n', "styles[1].id"),
        ('[[styles]]\nid = "a"\nname = "A"\ncolour = "red"\n', "styles[0].colour"),
        ('[[styles]]\nid = "a"\nname = 5\n', "styles[0].name"),
        ('[[styles]]\nid = "Not OK"\nname = "A"\n', "styles[0].id"),
        ('[[styles]]\nid = "a"\nname = "A"\nmodel = "no-slash"\n', "styles[0].model"),
        ('[[styles]]\nid = "a"\nname = "A"\n[styles.params]\nprompt = "x"\n', "styles[0].params"),
        ('[generate.shapes]\nsquare = "wide"\n', "generate.shapes.square"),
        ("[generate]\nmax_images = 9\n", "generate.max_images"),
    ],
)
def test_bad_style_or_shape_names_its_key(tmp_path: Path, toml: str, key: str) -> None:
    """A duplicate id, an unknown key or a wrong type in [[styles]] (or a bad shape) is a
    ConfigError naming `styles[N].key`."""
    config = write_config(tmp_path / "config.toml", toml)
    env = {"TELEGRAM_BOT_TOKEN": BOT_TOKEN, "REPLICATE_API_TOKEN": REPLICATE_TOKEN}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**env, "FAL_KEY": FAL_KEY}.items():
            mp.setenv(name, value)
        with pytest.raises(ConfigError) as caught:
            load_settings(config)
    assert caught.value.key.startswith(key), caught.value


def test_bad_style_stops_start_up_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A duplicate style id stops check-config and start-up: one stderr line, exit 2."""
    monkeypatch.chdir(tmp_path)
    for name, value in (
        ("TELEGRAM_BOT_TOKEN", BOT_TOKEN),
        ("REPLICATE_API_TOKEN", REPLICATE_TOKEN),
        ("FAL_KEY", FAL_KEY),
    ):
        monkeypatch.setenv(name, value)
    write_config(
        tmp_path / "config.toml",
        '[[styles]]\nid = "a"\nname = "A"\n[[styles]]\nid = "a"\nname = "B"\n',
    )
    for argv in (["check-config"], []):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("imagebot: configuration error: styles[1].id"), err


# -- styles ----------------------------------------------------------------------------------


async def test_styles_reach_replicate_as_model_and_params(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """The first style is the default: its model gets the create (owner/name route), with its
    params merged over generate.params (clamped) and its suffix after the prompt; /style
    offers the styles, and the one picked (a pinned version) goes to POST /v1/predictions."""
    replicate.version_models[VERSION] = "someone/sketcher"
    async with bot(styles=STYLES) as app:
        telegram.push_update(updates.command("/generate a harbour"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        telegram.push_update(updates.command("/style"))
        await wait_until(lambda: any(texts.STYLE_CHOOSE in t for t in telegram.texts(CHAT)))
        style_menu = menu(telegram, texts.STYLE_CHOOSE)
        assert button_data(style_menu) == [f"ps:{USER}:photo", f"ps:{USER}:sketch"]
        query = press(telegram, style_menu, f"ps:{USER}:sketch")
        await wait_until(lambda: answer(telegram, query) is not None)
        telegram.push_update(updates.command("/generate a harbour"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
        await jobs_done(app, 2)
        jobs = rows(db_path(app))
        prefs = rows(db_path(app), "SELECT * FROM user_prefs")
    first, second = replicate.creates
    assert first.path == f"/v1/models/{LORA_MODEL}/predictions"
    assert first.params["input"]["prompt"] == "a harbour, natural light"
    assert first.params["input"]["lora_weights"] == "someone/film-lora"
    assert first.params["input"]["lora_scale"] == 3.0
    assert first.params["input"]["output_format"] == "png"  # generate.params still apply
    assert second.path == "/v1/predictions"
    assert second.params["version"] == VERSION
    assert second.params["input"]["prompt"] == "a harbour"
    assert "lora_weights" not in second.params["input"]
    assert answer(telegram, query)["text"] == "Style: ✏️ Sketch"  # type: ignore[index]
    captions = [p.caption for p in telegram.photos(CHAT)]
    assert captions == ["a harbour\nStyle: 📷 Photo", "a harbour\nStyle: ✏️ Sketch"]
    assert [(j["style_id"], j["model"]) for j in jobs] == [
        ("photo", LORA_MODEL),
        ("sketch", f"someone/sketcher:{VERSION}"),
    ]
    assert [(p["user_id"], p["style_id"]) for p in prefs] == [(USER, "sketch")]
    assert "✓ ✏️ Sketch" in str(menu(telegram, texts.STYLE_CHOOSE).reply_markup)


async def test_without_styles_the_request_is_as_before(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """No [[styles]]: the configured model, exactly generate.params, the bare prompt as the
    caption; /style says there is nothing to choose."""
    async with bot() as app:
        telegram.push_update(updates.command("/generate a harbour"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        telegram.push_update(updates.command("/style"))
        await wait_until(lambda: texts.NO_STYLES in telegram.texts(CHAT))
        await jobs_done(app, 1)
    (create,) = replicate.creates
    assert create.path == "/v1/models/black-forest-labs/flux-schnell/predictions"
    assert create.params["input"] == {
        "num_outputs": 1,
        "aspect_ratio": "1:1",
        "output_format": "png",
        "prompt": "a harbour",
    }
    assert telegram.photos(CHAT)[0].caption == "a harbour"


async def test_queued_job_keeps_its_model_across_a_restart(
    make_settings, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A job made with a style records its model: after a restart with that style's model
    changed in config, the job still runs the model it was made with."""
    from tests.conftest import running

    replicate.latency_s = 30
    settings = make_settings(styles=STYLES, runner={"max_running": 1})
    async with running(settings) as app:
        telegram.push_update(updates.command("/generate first"))
        await wait_until(lambda: len(replicate.creates) == 1)
        telegram.push_update(updates.command("/generate second"))
        await wait_until(lambda: len(rows(db_path(app))) == 2)
    assert rows(db_path(app))[1]["status"] == "queued"
    changed = [{**STYLES[0], "model": "someone/newer-model"}, STYLES[1]]
    replicate.latency_s = 0.1
    async with running(make_settings(styles=changed)) as app:
        await wait_until(lambda: len(replicate.creates) >= 2, within=15)
        await wait_until(lambda: len(telegram.photos(CHAT)) >= 1, within=15)
    paths = {c.path for c in replicate.creates}
    assert paths == {f"/v1/models/{LORA_MODEL}/predictions"}


# -- shapes and counts -----------------------------------------------------------------------


async def test_settings_shape_and_count_reach_the_vendor(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """/settings stores a shape and a count; /generate asks for that aspect ratio and that
    many outputs; a shape button under the result reruns the prompt in its shape."""
    async with bot(generate={"max_images": 3}) as app:
        telegram.push_update(updates.command("/settings"))
        await wait_until(lambda: any("Your choices" in t for t in telegram.texts(CHAT)))
        settings_menu = menu(telegram, "Your choices")
        assert button_data(settings_menu) == [
            f"ph:{USER}:square",
            f"ph:{USER}:portrait",
            f"ph:{USER}:landscape",
            f"pc:{USER}:1",
            f"pc:{USER}:2",
            f"pc:{USER}:3",
        ]
        for data in (f"ph:{USER}:portrait", f"pc:{USER}:2"):
            query = press(telegram, settings_menu, data)
            await wait_until(lambda q=query: answer(telegram, q) is not None)
        await wait_until(
            lambda: "Images per request: 2" in (settings_menu.edits or [{}])[-1].get("text", "")
        )
        telegram.push_update(updates.command("/generate two towers"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
        await jobs_done(app, 1)
        keyboard = results_keyboard(telegram)
        assert "h:1:landscape" in button_data(keyboard)
        press(telegram, keyboard, "h:1:landscape")
        await wait_until(lambda: len(telegram.photos(CHAT)) == 4)
        await jobs_done(app, 2)
        jobs = rows(db_path(app))
    inputs = [c.params["input"] for c in replicate.creates]
    assert [(i["aspect_ratio"], i["num_outputs"], i["prompt"]) for i in inputs] == [
        ("3:4", 2, "two towers"),
        ("4:3", 2, "two towers"),
    ]
    assert [(j["shape"], j["images_asked"], j["parent_job_id"]) for j in jobs] == [
        ("portrait", 2, None),
        ("landscape", 2, 1),
    ]
    last_edit = settings_menu.edits[-1]
    assert "Shape: Portrait" in last_edit["text"]
    labels = [b["text"] for row in last_edit["reply_markup"]["inline_keyboard"] for b in row]
    assert "✓ Portrait" in labels and "✓ 2" in labels


async def test_caps_count_images_and_usage_says_so(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """With counts above 1 the daily cap counts images: 2 of 3 used leaves room for one image,
    so a request for two is refused with a plain reason; /usage counts images."""
    async with bot(generate={"max_images": 2, "daily_cap": 3}) as app:
        telegram.push_update(updates.command("/settings"))
        await wait_until(lambda: any("Your choices" in t for t in telegram.texts(CHAT)))
        query = press(telegram, menu(telegram, "Your choices"), f"pc:{USER}:2")
        await wait_until(lambda: answer(telegram, query) is not None)
        telegram.push_update(updates.command("/generate a pair of owls"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
        await jobs_done(app, 1)
        telegram.push_update(updates.command("/generate another pair"))
        await wait_until(lambda: any("1 image left today" in t for t in telegram.texts(CHAT)))
        telegram.push_update(updates.command("/usage"))
        await wait_until(lambda: any("Today (UTC)" in t for t in telegram.texts(CHAT)))
        spent = rows(db_path(app), "SELECT cost_estimate_usd FROM jobs")
    usage = next(t for t in telegram.texts(CHAT) if "Today (UTC)" in t)
    assert "Generate: 2 of 3 images used, 1 left" in usage
    assert "Each image counts" in usage
    assert len(replicate.creates) == 1
    assert spent[0]["cost_estimate_usd"] == pytest.approx(0.006)  # two images at 0.003


# -- honest safety outcomes --------------------------------------------------------------------


async def test_withheld_images_are_told_and_not_counted(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Asked for 2, the safety filter kept 1: the caption says so, and the cap, the spend and
    /usage count the one delivered."""
    replicate.withheld = 1
    async with bot(generate={"params": {"num_outputs": 2}, "daily_cap": 5}) as app:
        telegram.push_update(updates.command("/generate two cats"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        await jobs_done(app, 1)
        telegram.push_update(updates.command("/usage"))
        await wait_until(lambda: any("Today (UTC)" in t for t in telegram.texts(CHAT)))
        job = rows(db_path(app))[0]
    caption = telegram.photos(CHAT)[0].caption or ""
    assert "1 of 2 images was withheld by the provider's safety filter" in caption
    assert (job["images_asked"], job["images_delivered"], job["images_withheld"]) == (2, 1, 1)
    assert job["cost_estimate_usd"] == pytest.approx(0.003)
    usage = next(t for t in telegram.texts(CHAT) if "Today (UTC)" in t)
    assert "Generate: 1 of 5 images used, 4 left" in usage


async def test_all_images_withheld_fails_as_safety(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Every image withheld: the job fails with error code `safety`, a friendly message, and
    nothing is counted."""
    replicate.withheld = 2
    async with bot(generate={"params": {"num_outputs": 2}, "daily_cap": 5}) as app:
        telegram.push_update(updates.command("/generate two cats"))
        await jobs_done(app, 1)
        await wait_until(lambda: any("failed" in t for t in telegram.texts(CHAT)))
        telegram.push_update(updates.command("/usage"))
        await wait_until(lambda: any("Today (UTC)" in t for t in telegram.texts(CHAT)))
        job = rows(db_path(app))[0]
    assert (job["status"], job["error_code"]) == ("failed", "safety")
    assert any("safety filter" in t for t in telegram.texts(CHAT))
    assert telegram.photos(CHAT) == []
    usage = next(t for t in telegram.texts(CHAT) if "Today (UTC)" in t)
    assert "Generate: 0 of 5 images used" in usage


async def test_withheld_images_give_their_credits_back(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A paid job of 2 images that delivered 1 keeps one image's credits, returns the other."""
    replicate.withheld = 1
    credits = {
        "enabled": True,
        "generate_cost": 1,
        "welcome_credits": 10,
        "support_text": "s",
        "terms_text": "t",
        "privacy_text": "p",
        "packs": [{"id": "p", "credits": 10, "stars": 5, "title": "Ten"}],
    }
    async with bot(
        credits=credits, generate={"params": {"num_outputs": 2}, "daily_cap": 0}
    ) as app:
        telegram.push_update(updates.command("/generate two cats"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        await wait_until(
            lambda: len(rows(db_path(app), "SELECT * FROM credit_ledger")) == 3, within=10
        )
        ledger = rows(db_path(app), "SELECT kind, credits FROM credit_ledger ORDER BY id")
    assert [(r["kind"], r["credits"]) for r in ledger] == [
        ("welcome", 10),
        ("spend", -2),
        ("job_refund", 1),
    ]


async def test_fal_content_policy_422_is_a_safety_failure(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """fal's HTTP 422 with detail[].type content_policy_violation ends the edit as `safety`
    (never resent) with a friendly message naming no vendor parameter."""
    fal.refuse_submit = True
    file_id = telegram.add_file(updates_photo_bytes())
    async with bot() as app:
        telegram.push_update(updates.photo_message(file_id, caption="/edit make it odd"))
        await jobs_done(app, 1)
        await wait_until(lambda: any("failed" in t for t in telegram.texts(CHAT)))
        job = rows(db_path(app))[0]
    assert (job["status"], job["error_code"]) == ("failed", "safety")
    assert len(fal.submits) == 1
    failure = next(t for t in telegram.texts(CHAT) if "failed" in t)
    assert "safety filter" in failure and "content_policy" not in failure


async def test_fal_returning_fewer_images_is_told_too(
    bot, telegram: FakeTelegram, fal: FakeFal
) -> None:
    """An edit asking fal for 2 images that gets 1 back says one was withheld and counts one."""
    fal.withheld = 1
    file_id = telegram.add_file(updates_photo_bytes())
    async with bot(edit={"params": {"num_images": 2}}) as app:
        telegram.push_update(updates.photo_message(file_id, caption="/edit make it blue"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        await jobs_done(app, 1)
        job = rows(db_path(app))[0]
    assert fal.submits[0].params["num_images"] == 2
    assert "1 of 2 images was withheld" in (telegram.photos(CHAT)[0].caption or "")
    assert (job["images_asked"], job["images_delivered"]) == (2, 1)


def updates_photo_bytes() -> bytes:
    from tests.fakes.images import make_image

    return make_image(64, 48, (10, 200, 30), fmt="PNG")


@pytest.mark.parametrize("count", [1, 2])
async def test_spoiler_hides_every_result_photo(
    bot, telegram: FakeTelegram, replicate: FakeReplicate, count: int
) -> None:
    """[delivery] spoiler = true: the photo (sendPhoto) or every album item (sendMediaGroup)
    carries has_spoiler; off by default."""
    async with bot(delivery={"spoiler": True}, generate={"params": {"num_outputs": count}}):
        telegram.push_update(updates.command("/generate a secret"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == count)
    photos = telegram.photos(CHAT)
    assert all(p.has_spoiler for p in photos)
    assert {p.method for p in photos} == {"sendPhoto" if count == 1 else "sendMediaGroup"}


async def test_no_spoiler_by_default(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Without the setting, results are not hidden."""
    async with bot():
        telegram.push_update(updates.command("/generate plain"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
    assert not telegram.photos(CHAT)[0].has_spoiler


# -- remix -----------------------------------------------------------------------------------


async def test_remix_asks_and_runs_with_same_choices_after_a_restart(
    make_settings, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """🎨 Remix sends a forced-reply question; the reply to it, even after a restart, runs
    the new words with the remixed job's style, shape and count."""
    from tests.conftest import running

    replicate.version_models[VERSION] = "someone/sketcher"
    settings = make_settings(styles=STYLES, generate={"max_images": 2})
    async with running(settings) as app:
        for data in (f"ps:{USER}:sketch", f"ph:{USER}:landscape", f"pc:{USER}:2"):
            # choices set straight from buttons on a /settings message
            telegram.push_update(updates.command("/settings"))
            await wait_until(lambda: any("Your choices" in t for t in telegram.texts(CHAT)))
            query = press(telegram, menu(telegram, "Your choices"), data)
            await wait_until(lambda q=query: answer(telegram, q) is not None)
        telegram.push_update(updates.command("/generate a lighthouse"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 2)
        await jobs_done(app, 1)
        # the user changes their choices afterwards: the remix keeps the job's own
        query = press(telegram, menu(telegram, "Your choices"), f"ph:{USER}:square")
        await wait_until(lambda: answer(telegram, query) is not None)
        press(telegram, results_keyboard(telegram), "r:1")
        await wait_until(lambda: texts.REMIX_ASK in telegram.texts(CHAT))
    question = next(m for m in telegram.messages(CHAT) if m.text == texts.REMIX_ASK)
    assert (question.reply_markup or {}).get("force_reply") is True
    async with running(settings) as app:
        telegram.push_update(
            updates.text_message(
                "a lighthouse at night", reply_to=updates.bot_message_dict(question)
            )
        )
        await wait_until(lambda: len(telegram.photos(CHAT)) == 4, within=15)
        await jobs_done(app, 2)
        jobs = rows(db_path(app))
    remix = replicate.creates[-1].params
    assert remix["version"] == VERSION
    assert (remix["input"]["aspect_ratio"], remix["input"]["num_outputs"]) == ("4:3", 2)
    assert remix["input"]["prompt"] == "a lighthouse at night"
    assert (jobs[1]["style_id"], jobs[1]["shape"], jobs[1]["parent_job_id"]) == (
        "sketch",
        "landscape",
        1,
    )


async def test_reply_to_an_old_remix_question_has_expired(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A reply after generate.remix_reply_window_s makes no job and says the question expired;
    a reply by someone else makes none either."""
    async with bot(generate={"remix_reply_window_s": 0.5}, access={"open": True}) as app:
        telegram.push_update(updates.command("/generate a dune"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        press(telegram, results_keyboard(telegram), "r:1")
        await wait_until(lambda: texts.REMIX_ASK in telegram.texts(CHAT))
        question = next(m for m in telegram.messages(CHAT) if m.text == texts.REMIX_ASK)
        telegram.push_update(
            updates.text_message(
                "not mine", user_id=BOB, reply_to=updates.bot_message_dict(question)
            )
        )
        await wait_until(lambda: texts.REMIX_NOT_YOURS in telegram.texts(CHAT))
        await wait_until(lambda: _older_than(question, 0.6), within=5)
        telegram.push_update(
            updates.text_message("too late", reply_to=updates.bot_message_dict(question))
        )
        await wait_until(lambda: texts.REMIX_EXPIRED in telegram.texts(CHAT))
        assert len(rows(db_path(app))) == 1
    assert len(replicate.creates) == 1


def _older_than(message: SentMessage, seconds: float) -> bool:
    import time

    return time.time() - message.sent_at > seconds


# -- forged presses on the new buttons ---------------------------------------------------------


async def test_forged_presses_on_new_buttons_change_nothing(
    bot, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """Another user's shape/remix press, someone else's settings button, a malformed name, a
    count beyond the limit and data that is not on the message: each gets a short answer and
    makes no job, no question and no stored choice."""
    async with bot(generate={"max_images": 2}) as app:
        telegram.push_update(updates.command("/generate a cove"))
        await wait_until(lambda: len(telegram.photos(CHAT)) == 1)
        await jobs_done(app, 1)
        telegram.push_update(updates.command("/settings"))
        await wait_until(lambda: any("Your choices" in t for t in telegram.texts(CHAT)))
        result = results_keyboard(telegram)
        settings_menu = menu(telegram, "Your choices")
        forged = [
            (result, "h:1:portrait", BOB, texts.NOT_YOUR_JOB),
            (result, "r:1", BOB, texts.NOT_YOUR_JOB),
            (settings_menu, f"ph:{USER}:portrait", BOB, texts.NOT_YOUR_CHOICES),
            (result, "h:1:Portrait", USER, texts.BUTTON_EXPIRED),
            (result, "h:1:" + "x" * 40, USER, texts.BUTTON_EXPIRED),
            (result, "h:99:portrait", USER, texts.BUTTON_EXPIRED),
            (settings_menu, f"pc:{USER}:3", USER, texts.BUTTON_EXPIRED),  # not on the message
            (settings_menu, f"pq:{USER}:1", USER, texts.BUTTON_EXPIRED),
            (settings_menu, f"ps:{USER}:photo", USER, texts.BUTTON_EXPIRED),
        ]
        queries = [
            (press(telegram, msg, data, user_id=who), want) for msg, data, who, want in forged
        ]
        await wait_until(lambda: all(answer(telegram, q) for q, _ in queries))
        prefs = rows(db_path(app), "SELECT * FROM user_prefs")
        remixes = rows(db_path(app), "SELECT * FROM remix_prompts")
        jobs = rows(db_path(app))
    for (query, want), case in zip(queries, forged, strict=True):
        assert answer(telegram, query)["text"] == want, case  # type: ignore[index]
    assert prefs == [] and remixes == [] and len(jobs) == 1
    assert len(replicate.creates) == 1
    assert texts.REMIX_ASK not in telegram.texts(CHAT)


async def test_a_choice_no_longer_offered_is_refused(
    make_settings, telegram: FakeTelegram, replicate: FakeReplicate
) -> None:
    """A /settings button for a count the operator has since lowered stores nothing."""
    from tests.conftest import running

    async with running(make_settings(generate={"max_images": 3})):
        telegram.push_update(updates.command("/settings"))
        await wait_until(lambda: any("Your choices" in t for t in telegram.texts(CHAT)))
    settings_menu = menu(telegram, "Your choices")
    async with running(make_settings(generate={"max_images": 2})) as app:
        query = press(telegram, settings_menu, f"pc:{USER}:3")
        await wait_until(lambda: answer(telegram, query) is not None)
        prefs = rows(db_path(app), "SELECT * FROM user_prefs")
    assert answer(telegram, query)["text"] == texts.CHOICE_GONE  # type: ignore[index]
    assert prefs == []
