"""Settings: config.toml, IMAGEBOT_* overrides, secrets, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebot.config import load_settings
from imagebot.errors import ConfigError
from imagebot.models import JobKind

SECRETS = {
    "TELEGRAM_BOT_TOKEN": "123:abcDEF_-",
    "REPLICATE_API_TOKEN": "r8_x",
    "FAL_KEY": "id:secret",
}


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None = None, **kwargs: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path, **kwargs)
    return info.value


def test_repo_config_is_valid_and_matches_defaults(secrets: None) -> None:
    """The shipped config.toml loads and says what the code's defaults are."""
    repo = Path(__file__).resolve().parents[1] / "config.toml"
    from_file = load_settings(repo)
    assert from_file.telegram.mode == "polling"
    assert from_file.runner.max_running == 100
    assert from_file.generate.params == {
        "num_outputs": 1,
        "aspect_ratio": "1:1",
        "output_format": "png",
    }
    assert from_file.fal.edit_app == "fal-ai/nano-banana/edit"
    assert from_file.ops.listen == "127.0.0.1"


def test_environment_overrides_the_file(
    secrets: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMAGEBOT_<SECTION>__<KEY> wins over config.toml; lists come as JSON."""
    path = write(tmp_path, "[runner]\nmax_running = 7\n[limits]\nrate_per_minute = 3\n")
    monkeypatch.setenv("IMAGEBOT_RUNNER__MAX_RUNNING", "9")
    monkeypatch.setenv("IMAGEBOT_ACCESS__USERS", "[1, 2]")
    settings = load_settings(path)
    assert settings.runner.max_running == 9
    assert settings.limits.rate_per_minute == 3
    assert settings.access.users == [1, 2]


def test_config_path_from_environment(
    secrets: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMAGEBOT_CONFIG names the file when --config is not given."""
    monkeypatch.setenv("IMAGEBOT_CONFIG", str(write(tmp_path, "[ops]\nport = 9999\n")))
    assert load_settings().ops.port == 9999


def test_polling_switch_beats_file_and_environment(
    secrets: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--polling / --webhook override both config.toml and the environment."""
    monkeypatch.setenv("IMAGEBOT_TELEGRAM__MODE", "webhook")
    path = write(tmp_path, '[telegram]\nmode = "webhook"\n')
    assert load_settings(path, mode="polling").telegram.mode == "polling"


def test_missing_token_names_the_variable() -> None:
    """Without TELEGRAM_BOT_TOKEN start-up stops and says which variable to set."""
    error = error_of()
    assert error.key == "TELEGRAM_BOT_TOKEN"
    assert "export TELEGRAM_BOT_TOKEN=" in error.problem


def test_provider_keys_required_only_for_their_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """REPLICATE_API_TOKEN / FAL_KEY are needed only when that provider is selected."""
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", SECRETS["TELEGRAM_BOT_TOKEN"])
    assert error_of().key == "REPLICATE_API_TOKEN"
    monkeypatch.setenv("IMAGEBOT_GENERATE__PROVIDER", "local")
    assert error_of().key == "FAL_KEY"
    monkeypatch.setenv("IMAGEBOT_EDIT__PROVIDER", "local")
    assert load_settings().edit.provider == "local"


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[runner]\nmax_running = 0\n", "runner.max_running"),
        ("[limits]\nmax_running = 0\n", "limits.max_running"),  # its old name
        ("[limits]\nmax_runing = 5\n", "limits.max_runing"),
        ('[telegram]\nmode = "carrier-pigeon"\n', "telegram.mode"),
        ('[telegram]\napi_base_url = "api.telegram.org"\n', "telegram.api_base_url"),
        ('[replicate]\nmodel = "not a model"\n', "replicate.model"),
        ('[media]\nallowed_private_networks = ["nope"]\n', "media.allowed_private_networks"),
        ('[generate.params]\nprompt = "from config"\n', "generate.params.prompt"),
        ("[storage]\ninbox_retention_days = 1\n", "storage.inbox_retention_days"),
        ("[nonsense]\nx = 1\n", "nonsense"),
    ],
)
def test_invalid_settings_name_the_dotted_key(
    secrets: None, tmp_path: Path, toml: str, key: str
) -> None:
    """Every invalid value or unknown key is reported with its dotted name."""
    assert error_of(write(tmp_path, toml)).key == key


def test_webhook_mode_needs_url_and_secret(secrets: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Webhook mode requires webhook.url (https for Telegram's cloud) and a valid secret."""
    assert error_of(mode="webhook").key == "webhook.url"
    monkeypatch.setenv("IMAGEBOT_WEBHOOK__URL", "http://bot.example.com/telegram/webhook")
    assert "https" in error_of(mode="webhook").problem
    monkeypatch.setenv("IMAGEBOT_WEBHOOK__URL", "https://bot.example.com/telegram/webhook")
    assert error_of(mode="webhook").key == "IMAGEBOT_WEBHOOK_SECRET"
    monkeypatch.setenv("IMAGEBOT_WEBHOOK_SECRET", "spaces are not allowed")
    assert error_of(mode="webhook").key == "IMAGEBOT_WEBHOOK_SECRET"
    monkeypatch.setenv("IMAGEBOT_WEBHOOK_SECRET", "good_secret-123")
    assert load_settings(mode="webhook").telegram.mode == "webhook"


def test_public_ops_listener_needs_a_token(secrets: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-loopback ops.listen is refused without IMAGEBOT_OPS_TOKEN."""
    monkeypatch.setenv("IMAGEBOT_OPS__LISTEN", "0.0.0.0")  # noqa: S104 - config only, nothing binds
    assert error_of().key == "IMAGEBOT_OPS_TOKEN"
    monkeypatch.setenv("IMAGEBOT_OPS_TOKEN", "ops-secret")
    assert load_settings().ops.listen == "0.0.0.0"  # noqa: S104


def test_params_are_clamped(secrets: None, tmp_path: Path) -> None:
    """Backend parameters are clamped to the vendor's range in code."""
    path = write(
        tmp_path,
        "[generate.params]\nnum_outputs = 9\nguidance = -3.5\n[edit.params]\nnum_images = 0\n",
    )
    settings = load_settings(path)
    assert settings.generate.params["num_outputs"] == 4
    assert settings.generate.params["guidance"] == 0.0
    assert settings.edit.params["num_images"] == 1


def test_bad_toml_and_missing_file(secrets: None, tmp_path: Path) -> None:
    """A file that is not TOML, or not there, is reported as --config."""
    assert "not valid TOML" in error_of(write(tmp_path, "[limits\n")).problem
    assert error_of(tmp_path / "absent.toml").key == "--config"


def test_database_defaults_to_state_directory(
    secrets: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Under systemd (STATE_DIRECTORY set) the database lives there; results next to it."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    settings = load_settings(write(tmp_path, ""))
    assert settings.storage.database == tmp_path / "imagebot.db"
    assert settings.storage.results_dir == tmp_path / "results"


def test_runner_keys_under_their_old_limits_name_still_work(
    secrets: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[limits] max_running (file) and IMAGEBOT_LIMITS__MAX_ATTEMPTS (environment) land in
    [runner], each named in renamed_keys; the environment still wins over the file, whichever
    name each uses."""
    path = write(tmp_path, "[limits]\nmax_running = 7\nmax_attempts = 2\n")
    monkeypatch.setenv("IMAGEBOT_RUNNER__MAX_RUNNING", "9")
    monkeypatch.setenv("IMAGEBOT_LIMITS__MAX_ATTEMPTS", "5")
    settings = load_settings(path)
    assert (settings.runner.max_running, settings.runner.max_attempts) == (9, 5)
    assert sorted(settings.renamed_keys) == [
        ("limits.max_attempts", "runner.max_attempts"),
        ("limits.max_running", "runner.max_running"),
    ]
    monkeypatch.delenv("IMAGEBOT_LIMITS__MAX_ATTEMPTS")
    assert load_settings(write(tmp_path, "[runner]\nmax_running = 7\n")).renamed_keys == ()


def test_a_key_set_under_both_names_in_one_place_is_refused(secrets: None, tmp_path: Path) -> None:
    """Old and new name of the same key in one config.toml: an error naming the old key."""
    err = error_of(write(tmp_path, "[limits]\nmax_running = 7\n[runner]\nmax_running = 8\n"))
    assert err.key == "limits.max_running"
    assert "runner.max_running" in err.problem


def test_operation_gives_each_kind_its_section(secrets: None, tmp_path: Path) -> None:
    """Settings.operation(kind) is [generate] for generations and [edit] for edits."""
    settings = load_settings(write(tmp_path, "[generate]\ndaily_cap = 4\n[edit]\ndaily_cap = 2\n"))
    assert settings.operation(JobKind.GENERATE).daily_cap == 4
    assert settings.operation(JobKind.EDIT).daily_cap == 2
