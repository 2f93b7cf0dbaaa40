"""Every error imagebot raises on purpose, in one tree.

```
ImagebotError
  ConfigError                 names the dotted setting; start-up only
  StartupError                names the setting the machine refused (port in use, path); exit 1
  StoreError                  the database is newer than the code, or a migration failed
  UserInputError              .user_message shown in chat
  ProviderError               .provider, .code, .is_retryable, .retry_after_s
    ProviderTimeout           our deadline passed; the vendor request is canceled
    ProviderRejected          the vendor refused the input (4xx, safety filter): never retried
    SubmitOutcomeUnknown      a create/submit may have reached the vendor: never resent blindly
  MediaError                  .code, .is_retryable
    BlockedAddress            SSRF guard: scheme, host or resolved address not allowed
    MediaTooLarge             over a byte or pixel limit
    NotAnImage                the bytes are not an image we accept
    MediaExpired              the vendor no longer has the output
  DeliveryError               .code, .is_retryable: Telegram refused a send
```
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


class UserInputError(ImagebotError):
    """The user sent something we cannot work with; `user_message` says what to fix."""

    def __init__(self, user_message: str, code: str = "bad_input") -> None:
        super().__init__(code)
        self.user_message = user_message
        self.code = code


class ProviderError(ImagebotError):
    """A provider call failed.

    `code` is a stable snake_case name stored on the job and used for metrics; `is_retryable`
    says whether sending the same call again may succeed; `retry_after_s` is the vendor's hint.
    """

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
        super().__init__(message)
        self.provider = provider
        self.message = message
        self.code = code or self.default_code
        self.is_retryable = is_retryable
        self.retry_after_s = retry_after_s
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


class MediaError(ImagebotError):
    """A download or image check failed."""

    default_code = "media_error"

    def __init__(
        self, message: str, code: str | None = None, *, is_retryable: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.is_retryable = is_retryable


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


class DeliveryError(ImagebotError):
    """Telegram refused to take a message for the chat."""

    def __init__(self, message: str, code: str, *, is_retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.is_retryable = is_retryable
