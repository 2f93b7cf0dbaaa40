"""Every error imagebot raises on purpose, in one tree.

```
ImagebotError
  ConfigError                 names the dotted setting; start-up only
  StartupError                names the setting the machine refused (port in use, path); exit 1
  StoreError                  the database is newer than the code, or a migration failed
  ExternalError               .code, .is_retryable, .retry_after_s, .message
    ProviderError             .provider, .status: a vendor call failed
      ProviderTimeout         our deadline passed; the vendor request is canceled
      ProviderRejected        the vendor refused the input (4xx, safety filter): never retried
      SubmitOutcomeUnknown    a create/submit may have reached the vendor: never resent blindly
    MediaError                a download or image check failed
      BlockedAddress          SSRF guard: scheme, host or resolved address not allowed
      MediaTooLarge           over a byte or pixel limit
      NotAnImage              the bytes are not an image we accept
      MediaExpired            the vendor no longer has the output
    DeliveryError             Telegram refused a send
```

An ExternalError is decided where the outside answer is read (providers/, media.py,
delivery.py): whether it is worth another try (`is_retryable`, `retry_after_s`) is set there
once, and callers read the fields, never re-decide them. A user is told about a failure by its
stored `code` (texts.job_failed), which also works for a job that ends after a restart.
"""

from __future__ import annotations


class ImagebotError(Exception):
    """Base of every error imagebot raises on purpose."""


class ConfigError(ImagebotError):
    """A setting is missing or invalid; `key` is the dotted name (or the environment variable)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class StartupError(ImagebotError):
    """A valid setting the machine refused at start-up (a port in use, a path that cannot be
    created or written); `key` is the dotted setting, `problem` names the address or path."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class StoreError(ImagebotError):
    """The database cannot be used by this version of the code."""


class ExternalError(ImagebotError):
    """Something outside imagebot (a vendor, a media host, Telegram) failed an operation.

    `code` is a stable snake_case name stored on the job and used for metrics and logs;
    `is_retryable` says whether the same call again may succeed; `retry_after_s` is the other
    side's hint (Retry-After), if it gave one; `message` is the detail for operators (it may
    quote the other side, so it is redacted before storing and never shown to a user).
    """

    default_code = "error"

    def __init__(
        self,
        message: str,
        code: str | None = None,
        *,
        is_retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.is_retryable = is_retryable
        self.retry_after_s = retry_after_s


class ProviderError(ExternalError):
    """A provider call failed; `provider` names the vendor, `status` its HTTP status if any."""

    default_code = "provider_error"

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        code: str | None = None,
        is_retryable: bool = False,
        retry_after_s: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, code, is_retryable=is_retryable, retry_after_s=retry_after_s)
        self.provider = provider
        self.status = status


class ProviderTimeout(ProviderError):
    """The operation's deadline passed before the vendor finished."""

    default_code = "timeout"


class ProviderRejected(ProviderError):
    """The vendor refused the request for good (bad input, safety filter, 4xx)."""

    default_code = "rejected"


class SubmitOutcomeUnknown(ProviderError):
    """A create/submit was sent but no answer came back: it may exist at the vendor."""

    default_code = "submit_unknown"


class MediaError(ExternalError):
    """A download or image check failed."""

    default_code = "media_error"


class BlockedAddress(MediaError):
    """The SSRF guard refused a URL (scheme, host or address)."""

    default_code = "blocked_address"


class MediaTooLarge(MediaError):
    """A file is over the byte or pixel limit."""

    default_code = "too_large"


class NotAnImage(MediaError):
    """The bytes are not an image of an accepted format."""

    default_code = "not_an_image"


class MediaExpired(MediaError):
    """The vendor no longer serves the output (Replicate keeps outputs about an hour)."""

    default_code = "results_expired"


class DeliveryError(ExternalError):
    """Telegram refused to take a message for the chat."""

    default_code = "telegram_error"
