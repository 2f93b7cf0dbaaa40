"""Settings: config.toml, overridden by IMAGEBOT_<SECTION>__<KEY>; secrets from vendor variables.

Layers, highest first: command-line switches (`--polling`), the environment, config.toml, the
defaults below (`load_settings` hands each layer to its own settings source). Every problem
becomes one `ConfigError` naming the dotted key (or the environment variable) before any
network call is made. Keys that moved to another section are still read under their old name,
and `Settings.renamed_keys` says which were, so the log can tell the operator.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from imagebot.errors import ConfigError
from imagebot.models import JobKind

DEFAULT_TELEGRAM_API = "https://api.telegram.org"
SECRET_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
MODEL_REF_RE = re.compile(r"[\w.-]+/[\w.-]+(:[0-9a-f]{16,64})?")

# Backend parameters the user must never set: the user's text and photo go in these.
RESERVED_PARAMS = frozenset({"prompt", "image", "image_url", "image_urls", "input_image"})

# Clamps applied to the operator's [generate.params] / [edit.params] (vendor limits).
PARAM_CLAMPS: dict[str, tuple[float, float]] = {
    "num_outputs": (1, 4),
    "num_images": (1, 4),
    "num_inference_steps": (1, 50),
    "guidance": (0, 10),
    "guidance_scale": (0, 20),
    "output_quality": (0, 100),
    "lora_scale": (-1, 3),
    "extra_lora_scale": (-1, 3),
    "prompt_strength": (0, 1),
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TelegramSettings(Section):
    mode: Literal["polling", "webhook"] = "polling"
    api_base_url: str = DEFAULT_TELEGRAM_API
    local_mode: bool = False
    poll_timeout_s: int = Field(30, ge=0, le=50)
    groups_require_mention: bool = True
    rate_overall_per_s: float = Field(25, gt=0, le=1000)
    rate_per_chat_per_s: float = Field(1, gt=0, le=30)
    rate_group_per_min: float = Field(20, gt=0, le=600)
    max_send_retries: int = Field(5, ge=0, le=20)
    request_timeout_s: float = Field(20, gt=0, le=300)

    @field_validator("api_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @property
    def bot_url(self) -> str:
        return f"{self.api_base_url}/bot"

    @property
    def file_url(self) -> str:
        return f"{self.api_base_url}/file/bot"


class WebhookSettings(Section):
    url: str = ""
    listen: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    path: str = "/telegram/webhook"
    max_connections: int = Field(40, ge=1, le=100)
    # Replicate and fal call <url>/done/<job>/<token> when a request finishes (a wake-up only)
    completion_hints: bool = True
    # while hints arrive, a job polls only this often (a safety net for a lost hint)
    hint_safety_poll_s: float = Field(3.0, gt=0, le=60)

    @field_validator("path")
    @classmethod
    def _leading_slash(cls, value: str) -> str:
        return value if value.startswith("/") else f"/{value}"


class OpsSettings(Section):
    listen: str = "127.0.0.1"
    port: int = Field(9090, ge=0, le=65535)
    jobs_page_max: int = Field(200, ge=1, le=10000)

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.listen)


class StorageSettings(Section):
    # A SQLite file path, or a postgresql:// URL (libpq: PG* variables and ~/.pgpass apply)
    database: Path | str = Path()
    results_dir: Path = Path()
    synchronous: Literal["full", "normal"] = "full"
    inbox_retention_days: float = Field(8, ge=7)
    jobs_retention_days: float = Field(30, gt=0)
    results_retention_days: float = Field(7, gt=0)
    prune_interval_s: float = Field(3600, gt=0)
    # Where result images are kept for delivery and 📎 Original: "disk" (results_dir, one
    # host), "database" (table result_blobs: every process on any host reads them), "auto"
    # (disk on SQLite, database on PostgreSQL)
    results_store: Literal["auto", "disk", "database"] = "auto"

    @field_validator("database", mode="before")
    @classmethod
    def _database(cls, value: object) -> object:
        """A postgresql:// URL stays text (a Path would fold its //); anything else is a path."""
        if isinstance(value, str) and value.startswith(("postgresql://", "postgres://")):
            from psycopg.conninfo import conninfo_to_dict

            try:
                conninfo_to_dict(value)
            except Exception as exc:  # psycopg.ProgrammingError: libpq's parse error
                problem = " ".join(str(exc).split()) or "cannot be parsed"
                raise ValueError(f"is not a valid PostgreSQL URL ({problem})") from None
            return value
        if isinstance(value, str):
            return Path(value)
        return value

    @property
    def is_postgresql(self) -> bool:
        return isinstance(self.database, str)

    @property
    def results_in_database(self) -> bool:
        """True when result images go to the result_blobs table (see results_store)."""
        if self.results_store == "auto":
            return self.is_postgresql
        return self.results_store == "database"


class AccessSettings(Section):
    open: bool = False
    users: list[int] = []
    admins: list[int] = []
    chats: list[int] = []
    refusal_notice_interval_s: float = Field(3600, ge=0)
    # how often the bot re-reads the database allowlist and pause (set from another process)
    refresh_interval_s: float = Field(2.0, gt=0, le=3600)


class LimitsSettings(Section):
    """What a user may ask for: request rate, prompt length, the day's spend."""

    rate_per_minute: int = Field(5, ge=1, le=1000)
    max_prompt_chars: int = Field(500, ge=1, le=4000)
    daily_spend_usd: float = Field(0, ge=0)


class RunnerSettings(Section):
    """How jobs run: concurrency, vendor-call retries, the sweep, the circuit breaker."""

    max_running: int = Field(100, ge=1, le=10000)
    max_attempts: int = Field(3, ge=1, le=10)
    retry_base_s: float = Field(1.0, gt=0, le=60)
    retry_max_s: float = Field(20.0, gt=0, le=600)
    stale_slack_s: float = Field(60, ge=0)
    sweep_interval_s: float = Field(30, gt=0)
    circuit_failures: int = Field(5, ge=0, le=1000)
    circuit_cooldown_s: float = Field(30, gt=0, le=3600)


ROLES = ("intake", "worker", "maintenance")


class ClusterSettings(Section):
    """Several processes on one PostgreSQL database (issue 16): what this process does, and
    how fast a dead one's work is taken over."""

    # intake: webhook + completion hints + handlers (and polling, when it holds the lease);
    # worker: runs jobs; maintenance: may hold the cluster's maintenance lease
    roles: list[str] = list(ROLES)
    heartbeat_s: float = Field(5.0, gt=0, le=60)
    # a process silent this long is dead: its jobs are taken over, its leases lapse. The
    # others notice at their next heartbeat, so takeover comes within lease_s + heartbeat_s
    # of the last beat: 30 s with the defaults.
    lease_s: float = Field(25.0, gt=0, le=3600)
    # a job taken over from dead processes more often fails (it may be what kills them), unless
    # its images are made: those are delivered (see JobRunner._take)
    max_rescues: int = Field(3, ge=1, le=100)
    # A chat's update waits at most this long for the chat's earlier update that another
    # process still runs (or a dead one left: replayed once its lease lapses), then runs
    # anyway (log: chat_order_wait_gave_up). Unused on SQLite (one process).
    chat_order_wait_s: float = Field(60, gt=0, le=3600)

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: list[str]) -> list[str]:
        roles = [role.strip() for role in value if role.strip()]
        unknown = sorted(set(roles) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown role(s) {', '.join(unknown)}; known: {', '.join(ROLES)}")
        if not roles:
            raise ValueError(f"name at least one of {', '.join(ROLES)}")
        return [role for role in ROLES if role in roles]

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> ClusterSettings:
        if self.heartbeat_s * 3 > self.lease_s:
            raise _Problem("cluster.heartbeat_s", "must be at most a third of cluster.lease_s")
        return self


# Keys that moved: (old section, key) -> new section. The old name is still read (config.toml
# and IMAGEBOT_<OLD>__<KEY>), and logged as deprecated.
MOVED_KEYS: dict[tuple[str, str], str] = {
    ("limits", key): "runner" for key in RunnerSettings.model_fields
}


ParamValue = str | int | float | bool

# [generate.shapes] when the operator names none: plain names -> aspect ratios
DEFAULT_SHAPES = {"square": "1:1", "portrait": "3:4", "landscape": "4:3"}
# ids of styles and names of shapes: they travel in button data (64 bytes at most)
CHOICE_ID_RE = re.compile(r"[a-z0-9-]{1,32}")


class OperationSettings(Section):
    daily_cap: int = Field(50, ge=0)
    timeout_s: float = Field(90, gt=0, le=3600)
    cost_per_image_usd: float = Field(0.0, ge=0)
    params: dict[str, ParamValue] = {}

    @field_validator("params")
    @classmethod
    def _clamp(cls, params: dict[str, ParamValue]) -> dict[str, ParamValue]:
        return clamp_params(params)

    @property
    def outputs_per_job(self) -> int:
        value = self.params.get("num_outputs", self.params.get("num_images", 1))
        return int(value) if isinstance(value, int | float) else 1


class GenerateSettings(OperationSettings):
    provider: Literal["replicate", "local"] = "replicate"
    cost_per_image_usd: float = Field(0.003, ge=0)
    params: dict[str, ParamValue] = {
        "num_outputs": 1,
        "aspect_ratio": "1:1",
        "output_format": "png",
    }
    # plain shape names users pick (/settings, buttons under results) -> the model's ratio
    shapes: dict[str, str] = dict(DEFAULT_SHAPES)
    # how many images a user may ask for per request (the default is params.num_outputs)
    max_images: int = Field(1, ge=1, le=4)
    # how long a 🎨 Remix question waits for the user's reply with the new description
    remix_reply_window_s: float = Field(86400, gt=0)

    @field_validator("shapes")
    @classmethod
    def _shapes(cls, shapes: dict[str, str]) -> dict[str, str]:
        for name, ratio in shapes.items():
            if not CHOICE_ID_RE.fullmatch(name):
                raise _Problem(f"generate.shapes.{name}", "a shape name must be 1-32 of a-z 0-9 -")
            if not re.fullmatch(r"[1-9][0-9]{0,2}:[1-9][0-9]{0,2}", str(ratio)):
                raise _Problem(f"generate.shapes.{name}", 'must be a ratio like "3:4"')
        return shapes

    @property
    def most_images(self) -> int:
        """The largest image count a user may choose (never below the operator's default)."""
        return max(self.max_images, self.outputs_per_job)


class EditSettings(OperationSettings):
    provider: Literal["fal", "local"] = "fal"
    daily_cap: int = Field(20, ge=0)
    timeout_s: float = Field(30, gt=0, le=3600)
    cost_per_image_usd: float = Field(0.039, ge=0)
    max_input_side_px: int = Field(2048, ge=64, le=8192)
    conversation_timeout_s: float = Field(300, gt=0)
    params: dict[str, ParamValue] = {"num_images": 1, "output_format": "png"}
    # An album captioned /edit becomes one edit of up to this many photos (issue 17).
    max_input_images: int = Field(4, ge=1, le=10)
    # The album is complete once no new photo of it arrived for this long.
    album_quiet_s: float = Field(2.0, ge=0.2, le=60)


_MODEL_REF = re.compile(r"[\w.-]+/[\w.-]+(:[0-9a-f]{16,64})?")


class UpscaleSettings(OperationSettings):
    """⤴ Upscale under each result: a third operation, off until `model` is set (issue 17)."""

    provider: Literal["replicate", "local"] = "replicate"
    # e.g. "nightmareai/real-esrgan:<version id>"; empty = no upscale button
    model: str = ""
    daily_cap: int = Field(20, ge=0)
    timeout_s: float = Field(120, gt=0, le=3600)
    cost_per_image_usd: float = Field(0.002, ge=0)
    params: dict[str, ParamValue] = {}

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        if value and not _MODEL_REF.fullmatch(value):
            raise ValueError("must be 'owner/name' or 'owner/name:<version id>'")
        return value

    @property
    def enabled(self) -> bool:
        return self.provider == "local" or bool(self.model)


class ReplicateSettings(Section):
    base_url: str = "https://api.replicate.com"
    model: str = "black-forest-labs/flux-schnell"
    poll_interval_s: float = Field(0.25, gt=0, le=30)
    max_requests_per_s: float = Field(40, gt=0)
    request_timeout_s: float = Field(30, gt=0)

    @field_validator("model")
    @classmethod
    def _model_ref(cls, value: str) -> str:
        if not MODEL_REF_RE.fullmatch(value):
            raise ValueError("must be 'owner/name' or 'owner/name:<version id>'")
        return value


class FalSettings(Section):
    base_url: str = "https://queue.fal.run"
    edit_app: str = "fal-ai/nano-banana/edit"
    poll_interval_s: float = Field(0.25, gt=0, le=30)
    max_requests_per_s: float = Field(40, gt=0)
    request_timeout_s: float = Field(30, gt=0)

    @field_validator("edit_app")
    @classmethod
    def _app_ref(cls, value: str) -> str:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w./-]+)?", value):
            raise ValueError("must look like 'owner/app' or 'owner/app/path'")
        return value


class MediaSettings(Section):
    allowed_hosts: list[str] = [
        "replicate.delivery",
        "*.replicate.delivery",
        "fal.media",
        "*.fal.media",
        "storage.googleapis.com",
    ]
    allowed_private_networks: list[str] = []
    max_bytes: int = Field(20_000_000, ge=1024)
    max_pixels: int = Field(40_000_000, ge=10_000)
    timeout_s: float = Field(30, gt=0)
    max_redirects: int = Field(3, ge=0, le=10)
    # downloads from the vendors' CDNs also go through network.proxy (SSRF checks still local)
    via_proxy: bool = False

    @field_validator("allowed_private_networks")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not an IP network") from exc
        return values


class ProgressSettings(Section):
    edit_interval_s: float = Field(3, ge=1)
    group_edit_interval_s: float = Field(10, ge=3)
    chat_action_interval_s: float = Field(4, ge=1, le=5)
    queue_refresh_s: float = Field(5, ge=1)


class DeliverySettings(Section):
    """Results and chat notices that Telegram cannot take now (unreachable, 5xx, flood)."""

    # how long a made result keeps being offered to Telegram before the job fails
    retry_window_s: float = Field(21600, gt=0)
    retry_base_s: float = Field(5.0, gt=0, le=600)  # first wait; doubles each try, with jitter
    retry_max_s: float = Field(300.0, gt=0, le=3600)  # longest wait between tries
    check_interval_s: float = Field(5.0, gt=0, le=300)  # how often due retries are started
    # idle bots prove the database still takes writes this often (for /healthz)
    write_probe_interval_s: float = Field(30.0, gt=0, le=3600)
    # send every result photo hidden under a spoiler (tap to reveal), e.g. for group chats
    spoiler: bool = False


class LogSettings(Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class CreditPack(Section):
    """One [[credits.packs]] entry: what /buy offers."""

    id: str
    credits: int = Field(ge=1, le=1_000_000)
    stars: int = Field(ge=1, le=100_000)  # whole Stars (XTR has no minor units)
    title: str = Field(min_length=1, max_length=32)  # Telegram's invoice title limit

    @field_validator("id")
    @classmethod
    def _pack_id(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9-]{1,32}", value):
            raise ValueError("must be 1-32 of a-z 0-9 -")
        return value


class CreditsSettings(Section):
    """Credits bought with Telegram Stars and spent past the free daily caps (off by default)."""

    enabled: bool = False
    generate_cost: int = Field(1, ge=0, le=10_000)  # credits per delivered image
    edit_cost: int = Field(3, ge=0, le=10_000)
    upscale_cost: int = Field(1, ge=0, le=10_000)  # if the upscale operation exists
    welcome_credits: int = Field(0, ge=0, le=1_000_000)  # granted once to a new allowed user
    support_text: str = ""  # /paysupport (Telegram requires it)
    terms_text: str = ""  # /terms
    privacy_text: str = ""  # /privacy
    reconcile_interval_s: float = Field(3600, ge=10)  # getStarTransactions pass (and at start)
    reconcile_page_size: int = Field(100, ge=1, le=100)  # entries per getStarTransactions call
    packs: list[CreditPack] = []

    @model_validator(mode="after")
    def _check(self) -> CreditsSettings:
        seen: set[str] = set()
        for n, pack in enumerate(self.packs):
            if pack.id in seen:
                raise _Problem(f"credits.packs.{n}.id", f"{pack.id!r} is used by another pack")
            seen.add(pack.id)
        if self.enabled:
            if not self.packs:
                raise _Problem("credits.packs", "needs at least one pack when credits are enabled")
            for key in ("support_text", "terms_text", "privacy_text"):
                if not getattr(self, key).strip():
                    raise _Problem(
                        f"credits.{key}",
                        "is required when credits are enabled (Telegram asks "
                        "bots that sell to answer /paysupport, /terms and /privacy)",
                    )
        return self

    def pack(self, pack_id: str) -> CreditPack | None:
        return next((p for p in self.packs if p.id == pack_id), None)


class StyleSettings(Section):
    """One [[styles]] entry: a look users pick with /style (a model, a prompt suffix, params)."""

    id: str
    name: str = Field(min_length=1, max_length=32)  # what users see on the button
    model: str | None = None  # "owner/name" or "owner/name:<version>"; None = replicate.model
    prompt_suffix: str = Field("", max_length=500)  # appended to the user's prompt
    params: dict[str, ParamValue] = {}  # merged over generate.params (clamped the same way)

    @field_validator("id")
    @classmethod
    def _style_id(cls, value: str) -> str:
        if not CHOICE_ID_RE.fullmatch(value):
            raise ValueError("must be 1-32 of a-z 0-9 -")
        return value

    @field_validator("model")
    @classmethod
    def _style_model(cls, value: str | None) -> str | None:
        if value is not None and not MODEL_REF_RE.fullmatch(value):
            raise ValueError("must be 'owner/name' or 'owner/name:<version id>'")
        return value

    @field_validator("params")
    @classmethod
    def _style_params(cls, params: dict[str, ParamValue]) -> dict[str, ParamValue]:
        return clamp_params(params)


PROXY_SCHEMES = ("http", "socks5", "socks5h")


def check_proxy_url(url: str) -> None:
    """Raise ValueError when `url` is not `scheme://[user[:password]@]host:port`.

    The message never repeats the URL: it may hold a password.
    """
    parts = urlsplit(url)
    if parts.scheme not in PROXY_SCHEMES:
        raise ValueError(
            f"must start with one of {', '.join(s + '://' for s in PROXY_SCHEMES)} "
            "(e.g. socks5://127.0.0.1:1080 or http://proxy:3128)"
        )
    if not parts.hostname:
        raise ValueError("has no host (e.g. socks5://127.0.0.1:1080)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    if not port:
        raise ValueError("needs a port (e.g. socks5://127.0.0.1:1080 or http://proxy:3128)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be only scheme://host:port (no path or query)")


def check_ca_bundle(path: Path) -> None:
    """Raise ValueError unless `path` is a readable PEM file holding at least one certificate."""
    try:
        ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        raise ValueError(f"file not found: {path}") from None
    except PermissionError:
        raise ValueError(f"cannot read {path}: permission denied") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a PEM file") from None
    except ssl.SSLError as exc:
        raise ValueError(f"{path} holds no usable PEM certificate ({exc.reason})") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


class NetworkSettings(Section):
    """How outgoing connections leave the host: an optional proxy and an extra CA bundle."""

    # every Bot API and vendor API call goes through it (socks5://host:port, http://host:port);
    # a URL with a password belongs in IMAGEBOT_PROXY_URL
    proxy: str = ""
    # PEM bundle trusted on top of the system's and certifi's (a TLS-inspecting proxy's CA)
    ca_file: Path | None = None

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: str) -> str:
        value = value.strip()
        if value:
            check_proxy_url(value)
            if urlsplit(value).password is not None:
                raise ValueError(
                    "must not hold a password (config files get shared): "
                    "put the whole URL in IMAGEBOT_PROXY_URL instead"
                )
        return value

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            check_ca_bundle(value)
        return value


class Settings(BaseSettings):
    """All of imagebot's settings; secrets come from their own environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="IMAGEBOT_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    telegram: TelegramSettings = TelegramSettings()
    webhook: WebhookSettings = WebhookSettings()
    ops: OpsSettings = OpsSettings()
    storage: StorageSettings = StorageSettings()
    access: AccessSettings = AccessSettings()
    limits: LimitsSettings = LimitsSettings()
    runner: RunnerSettings = RunnerSettings()
    cluster: ClusterSettings = ClusterSettings()
    generate: GenerateSettings = GenerateSettings()
    edit: EditSettings = EditSettings()
    replicate: ReplicateSettings = ReplicateSettings()
    fal: FalSettings = FalSettings()
    media: MediaSettings = MediaSettings()
    progress: ProgressSettings = ProgressSettings()
    logs: LogSettings = LogSettings()
    credits: CreditsSettings = CreditsSettings()
    delivery: DeliverySettings = DeliverySettings()
    upscale: UpscaleSettings = UpscaleSettings()
    styles: list[StyleSettings] = []  # [[styles]]: the first is the default; none = one look
    network: NetworkSettings = NetworkSettings()

    telegram_bot_token: SecretStr | None = Field(None, validation_alias="TELEGRAM_BOT_TOKEN")
    replicate_api_token: SecretStr | None = Field(None, validation_alias="REPLICATE_API_TOKEN")
    fal_key: SecretStr | None = Field(None, validation_alias="FAL_KEY")
    webhook_secret: SecretStr | None = Field(None, validation_alias="IMAGEBOT_WEBHOOK_SECRET")
    ops_token: SecretStr | None = Field(None, validation_alias="IMAGEBOT_OPS_TOKEN")
    # the proxy URL with its credentials (overrides network.proxy, which must then agree)
    proxy_url: SecretStr | None = Field(None, validation_alias="IMAGEBOT_PROXY_URL")

    # (old dotted key, new dotted key) of every moved key that was set under its old name
    _renamed_keys: tuple[tuple[str, str], ...] = PrivateAttr(default=())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """`Settings(**tables)`: the environment, then the tables given (load_settings builds
        its own layers, see from_layers)."""
        given = init_settings.init_kwargs if isinstance(init_settings, InitSettingsSource) else {}
        return Environment(settings_cls), Layer(settings_cls, given)

    @classmethod
    def from_layers(cls, *, command_line: dict[str, Any], config_file: dict[str, Any]) -> Settings:
        """Highest first: command-line switches, the environment, config.toml, defaults.
        Raises ConfigError naming the key as the operator wrote it."""
        layers = (
            Layer(cls, command_line),
            Environment(cls),
            Layer(cls, config_file),
        )
        try:
            settings = cls(_build_sources=(layers, {}))
        except ValidationError as exc:
            renamed = {new: old for layer in layers for old, new in layer.renamed}
            raise _format_error(exc, renamed) from None
        settings._renamed_keys = tuple(dict.fromkeys(r for layer in layers for r in layer.renamed))
        return settings

    @property
    def renamed_keys(self) -> tuple[tuple[str, str], ...]:
        """Moved keys that were set under their old name: (old, new) dotted keys."""
        return self._renamed_keys

    def operation(self, kind: JobKind) -> GenerateSettings | EditSettings | UpscaleSettings:
        """The section of a job kind: [generate], [edit] or [upscale]."""
        if kind is JobKind.GENERATE:
            return self.generate
        if kind is JobKind.EDIT:
            return self.edit
        return self.upscale

    @model_validator(mode="after")
    def _params_leave_the_users_input_alone(self) -> Settings:
        for kind in JobKind:
            reserved = sorted(RESERVED_PARAMS & self.operation(kind).params.keys())
            if reserved:
                raise _Problem(
                    f"{kind.value}.params.{reserved[0]}", "comes from the user, not from config"
                )
        return self

    @model_validator(mode="after")
    def _styles_are_distinct_and_leave_the_users_input_alone(self) -> Settings:
        _check_styles(self)
        return self

    @model_validator(mode="after")
    def _network_settings_agree(self) -> Settings:
        _check_network(self)
        return self

    def check_ready_to_serve(self) -> None:
        """What running the bot needs beyond valid values (a database-only shell command does
        not): the token and the vendors' keys, a complete webhook mode, a protected ops
        server. Raises ConfigError naming the variable or key."""
        try:
            _check_secrets_are_set(self)
            _check_webhook_mode(self)
            _check_ops_server_is_protected(self)
        except _Problem as exc:
            raise ConfigError(exc.key, exc.problem) from None

    def style(self, style_id: str | None) -> StyleSettings | None:
        """The style with this id, else the default (the first), else None (no styles)."""
        found = next((s for s in self.styles if s.id == style_id), None)
        return found or (self.styles[0] if self.styles else None)

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log redactor."""
        secrets = (
            self.telegram_bot_token,
            self.replicate_api_token,
            self.fal_key,
            self.webhook_secret,
            self.ops_token,
            self.proxy_url,
        )
        found = [s.get_secret_value() for s in secrets if s and s.get_secret_value()]
        password = urlsplit(self.proxy_url.get_secret_value()).password if self.proxy_url else None
        if password:  # as written in the URL and as sent to the proxy
            found += sorted({password, unquote(password)})
        return found

    @property
    def effective_proxy(self) -> str:
        """The proxy every outgoing API call uses ('' for none): IMAGEBOT_PROXY_URL first."""
        if self.proxy_url is not None and self.proxy_url.get_secret_value().strip():
            return self.proxy_url.get_secret_value().strip()
        return self.network.proxy

    @property
    def bot_token(self) -> str:
        assert self.telegram_bot_token is not None  # guaranteed by check_ready_to_serve
        return self.telegram_bot_token.get_secret_value()


def _move_renamed(tables: dict[str, Any]) -> list[tuple[str, str]]:
    """Move keys set under an old section name to their new section, in one layer's tables;
    return (old, new) dotted keys. Both names in the same layer is a ConfigError."""
    renamed: list[tuple[str, str]] = []
    for (old_section, key), new_section in MOVED_KEYS.items():
        old = tables.get(old_section)
        if not isinstance(old, dict) or key not in old:
            continue
        new = tables.setdefault(new_section, {})
        if not isinstance(new, dict):
            continue  # a malformed section: validation names it
        if key in new:
            raise ConfigError(
                f"{old_section}.{key}",
                f"is also set as {new_section}.{key}: keep only {new_section}.{key}",
            )
        new[key] = old.pop(key)
        renamed.append((f"{old_section}.{key}", f"{new_section}.{key}"))
    return renamed


class Layer(PydanticBaseSettingsSource):
    """Settings handed over as tables (config.toml's, or the command line's switches)."""

    def __init__(self, settings_cls: type[BaseSettings], tables: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self.tables = copy.deepcopy(dict(tables))
        self.renamed = _move_renamed(self.tables)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.tables.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.tables


class Environment(EnvSettingsSource):
    """IMAGEBOT_<SECTION>__<KEY> and the secrets' own variables. A list or table value that is
    not JSON is a ConfigError naming the variable."""

    renamed: list[tuple[str, str]] = []  # noqa: RUF012 - replaced by each call

    def __call__(self) -> dict[str, Any]:
        tables = super().__call__()
        self.renamed = _move_renamed(tables)
        return tables

    def explode_env_vars(
        self, field_name: str, field: FieldInfo, env_vars: Mapping[str, str | None]
    ) -> dict[str, Any]:
        try:
            return super().explode_env_vars(field_name, field, env_vars)
        except ValueError:
            raise _not_json(field_name, field) from None


class _Problem(ValueError):
    """A cross-field problem that must name its own key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def _check_secrets_are_set(s: Settings) -> None:
    if s.telegram_bot_token is None or not s.telegram_bot_token.get_secret_value().strip():
        raise _Problem(
            "TELEGRAM_BOT_TOKEN",
            "is not set: export TELEGRAM_BOT_TOKEN=<token from @BotFather>",
        )
    if not re.fullmatch(r"\d+:[A-Za-z0-9_-]+", s.telegram_bot_token.get_secret_value()):
        raise _Problem("TELEGRAM_BOT_TOKEN", "does not look like a bot token ('123456:ABC-...')")
    if s.generate.provider == "replicate" and not s.replicate_api_token:
        raise _Problem(
            "REPLICATE_API_TOKEN",
            "is not set: export REPLICATE_API_TOKEN=r8_... "
            '(or set generate.provider = "local" to try the bot without Replicate)',
        )
    if s.edit.provider == "fal" and not s.fal_key:
        raise _Problem(
            "FAL_KEY",
            "is not set: export FAL_KEY=<key id>:<key secret> "
            '(or set edit.provider = "local" to try the bot without fal.ai)',
        )
    if s.upscale.enabled and s.upscale.provider == "replicate" and not s.replicate_api_token:
        raise _Problem(
            "REPLICATE_API_TOKEN",
            f"is not set, and upscale.model = {s.upscale.model!r} runs on Replicate "
            "(or leave upscale.model empty to switch upscaling off)",
        )


def _check_webhook_mode(s: Settings) -> None:
    if s.telegram.mode == "webhook":
        if not s.webhook.url:
            raise _Problem("webhook.url", "is required in webhook mode (the public https URL)")
        official = s.telegram.api_base_url == DEFAULT_TELEGRAM_API
        if official and not s.webhook.url.startswith("https://"):
            raise _Problem("webhook.url", "must be an https:// URL (Telegram requires TLS)")
        if s.webhook_secret is None:
            raise _Problem(
                "IMAGEBOT_WEBHOOK_SECRET",
                "is not set: webhook mode needs a secret token (1-256 of A-Z a-z 0-9 _ -)",
            )
        if not SECRET_TOKEN_RE.fullmatch(s.webhook_secret.get_secret_value()):
            raise _Problem(
                "IMAGEBOT_WEBHOOK_SECRET", "must be 1-256 characters of A-Z a-z 0-9 _ -"
            )


def _check_ops_server_is_protected(s: Settings) -> None:
    if not s.ops.is_loopback and s.ops_token is None:
        raise _Problem(
            "IMAGEBOT_OPS_TOKEN",
            f"is required because ops.listen = {s.ops.listen!r} is not a loopback address",
        )


def _check_styles(s: Settings) -> None:
    seen: set[str] = set()
    for n, style in enumerate(s.styles):
        if style.id in seen:
            raise _Problem(f"styles[{n}].id", f"{style.id!r} is used by another style")
        seen.add(style.id)
        reserved = sorted(RESERVED_PARAMS & style.params.keys())
        if reserved:
            raise _Problem(f"styles[{n}].params.{reserved[0]}", "comes from the user, not config")


def _check_network(s: Settings) -> None:
    if s.proxy_url is not None and s.proxy_url.get_secret_value().strip():
        secret = s.proxy_url.get_secret_value().strip()
        try:
            check_proxy_url(secret)
        except ValueError as exc:
            raise _Problem("IMAGEBOT_PROXY_URL", str(exc)) from None
        if s.network.proxy:
            ours, theirs = urlsplit(s.network.proxy), urlsplit(secret)
            where = (ours.scheme, ours.hostname, ours.port)
            if where != (theirs.scheme, theirs.hostname, theirs.port):
                raise _Problem(
                    "IMAGEBOT_PROXY_URL",
                    "names another proxy than network.proxy: make them agree, or leave "
                    "network.proxy empty",
                )
    cert_file = os.environ.get("SSL_CERT_FILE", "")
    if cert_file:
        try:
            check_ca_bundle(Path(cert_file))
        except ValueError as exc:
            raise _Problem("SSL_CERT_FILE", str(exc)) from None


def clamp_params(params: Mapping[str, ParamValue]) -> dict[str, ParamValue]:
    """Clamp known numeric backend parameters into the vendor's accepted range."""
    out: dict[str, ParamValue] = {}
    for key, value in params.items():
        bounds = PARAM_CLAMPS.get(key)
        if bounds and isinstance(value, int | float) and not isinstance(value, bool):
            low, high = bounds
            clamped = min(max(value, low), high)
            value = int(clamped) if isinstance(value, int) else float(clamped)
        out[key] = value
    return out


def is_loopback_host(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _config_path(explicit: str | Path | None) -> Path | None:
    if explicit:
        return Path(explicit)
    from_env = os.environ.get("IMAGEBOT_CONFIG")
    if from_env:
        return Path(from_env)
    default = Path("config.toml")
    return default if default.is_file() else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None


def _default_paths(data: dict[str, Any]) -> None:
    """Database next to systemd's StateDirectory if there is one, else ./data."""
    storage = data.setdefault("storage", {})
    if not isinstance(storage, dict):
        return
    state_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    base = Path(state_dir) if state_dir else Path("data")
    if not storage.get("database"):
        storage["database"] = str(base / "imagebot.db")
    if not storage.get("results_dir"):
        database = str(storage["database"])
        if database.startswith(("postgresql://", "postgres://")) or os.environ.get(
            "IMAGEBOT_STORAGE__DATABASE", ""
        ).startswith(("postgresql://", "postgres://")):
            storage["results_dir"] = str(base / "results")
        else:
            storage["results_dir"] = str(Path(database).parent / "results")


def url_password(url: str) -> bool:
    """True when a postgresql:// URL carries a password (user:password@host or ?password=)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        return bool(conninfo_to_dict(url).get("password"))
    except Exception:  # psycopg.ProgrammingError: the field validator names the problem
        return False


def _refuse_password_in_file(data: dict[str, Any]) -> None:
    """A PostgreSQL password belongs in the environment or a passfile, not in config.toml."""
    storage = data.get("storage")
    database = storage.get("database") if isinstance(storage, dict) else None
    if (
        isinstance(database, str)
        and database.startswith(("postgresql://", "postgres://"))
        and url_password(database)
    ):
        raise ConfigError(
            "storage.database",
            "the PostgreSQL URL in the config file holds a password: remove it and set "
            "PGPASSWORD, use a passfile (~/.pgpass), or put the whole URL in "
            "IMAGEBOT_STORAGE__DATABASE",
        )


def _format_error(exc: ValidationError, renamed: Mapping[str, str] | None = None) -> ConfigError:
    """The first problem as a ConfigError; a moved key set under its old name is named so."""
    err = exc.errors()[0]
    loc = [str(part) for part in err["loc"]]
    ctx = err.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, _Problem):
        return ConfigError(inner.key, inner.problem)
    key = ".".join(loc) or "config"
    if len(loc) >= 2 and loc[0] == "styles" and loc[1].isdigit():
        key = ".".join([f"styles[{loc[1]}]", *loc[2:]])  # as the operator wrote [[styles]]
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "is not a known setting"
    old = (renamed or {}).get(key)
    if old is not None:
        return ConfigError(old, f"{message} (the key is now {key})")
    return ConfigError(key, message)


def load_settings(
    config_path: str | Path | None = None,
    *,
    mode: str | None = None,
    secrets: bool = True,
    roles: list[str] | None = None,
) -> Settings:
    """Read config.toml (or --config / IMAGEBOT_CONFIG) plus the environment; raise ConfigError.

    `secrets=False` skips the checks of the token and keys (for database-only commands)."""
    path = _config_path(config_path)
    config_file: dict[str, Any] = _read_toml(path) if path else {}
    _refuse_password_in_file(config_file)
    _default_paths(config_file)
    command_line: dict[str, Any] = {"telegram": {"mode": mode}} if mode else {}
    if roles is not None:  # --roles: this process only (the file is shared by all of them)
        command_line["cluster"] = {"roles": roles}
    settings = Settings.from_layers(command_line=command_line, config_file=config_file)
    if secrets:
        settings.check_ready_to_serve()
    return settings


def _not_json(section: str, field: FieldInfo) -> ConfigError:
    """Name the IMAGEBOT_<SECTION>__<KEY> variable whose list or table value is not JSON."""
    prefix = f"IMAGEBOT_{section.upper()}__"
    model = field.annotation
    for name, value in os.environ.items():
        sub = name[len(prefix) :].lower()
        if not name.upper().startswith(prefix) or not isinstance(model, type):
            continue
        sub_field = getattr(model, "model_fields", {}).get(sub)
        if sub_field is None or not isinstance(sub_field.default, list | dict):
            continue  # only lists and tables are read as JSON
        try:
            json.loads(value)
        except ValueError:
            example = "'[123, 456]'" if isinstance(sub_field.default, list) else """'{"a": 1}'"""
            return ConfigError(f"{section}.{sub}", f"{name} must be JSON, e.g. {name}={example}")
    return ConfigError(section, "an IMAGEBOT_* value could not be read")
