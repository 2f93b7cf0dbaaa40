"""Plain data the layers pass to each other: job status, kinds, jobs and provider results."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class JobKind(StrEnum):
    GENERATE = "generate"
    EDIT = "edit"
    UPSCALE = "upscale"  # a result image made larger (issue 17)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


class Phase(StrEnum):
    """Where a running job is (what a restart resumes from), then whether a final job's chat
    was tidied."""

    NEW = "new"  # nothing sent to the vendor yet
    SUBMITTING = "submitting"  # create/submit sent, no request id saved: outcome unknown
    SUBMITTED = "submitted"  # vendor request id saved; waiting for it
    FETCHED = "fetched"  # outputs downloaded to the results directory
    DELIVERING = "delivering"  # sending to Telegram; message ids not yet saved
    # The phases below belong to final rows (succeeded, failed, canceled):
    SETTLING = "settling"  # final status written; the chat not tidied yet (Pipeline.settle)
    DONE = "done"  # final status written and the chat tidied


# A running job in these phases has its images made: the vendor is done with it, it needs no
# provider slot, and its photos may be in the chat already (delivering).
IMAGES_MADE: tuple[Phase, ...] = (Phase.FETCHED, Phase.DELIVERING)


class CancelOutcome(StrEnum):
    """What a user's cancel of a job came to (JobRunner.cancel; the handlers word it)."""

    CANCELED = "canceled"
    NOT_FOUND = "not_found"
    NOT_YOURS = "not_yours"
    FINISHED = "finished"
    TOO_LATE = "too_late"


@dataclass(slots=True)
class Job:
    """One row of the `jobs` table."""

    id: int
    kind: JobKind
    status: JobStatus
    phase: Phase
    update_id: int
    chat_id: int
    user_id: int
    chat_type: str
    prompt: str
    provider: str
    params: dict[str, Any]
    created_at: str
    command_message_id: int | None = None
    status_message_id: int | None = None
    input_file_id: str | None = None
    input_file_size: int | None = None
    input_width: int | None = None
    input_height: int | None = None
    parent_job_id: int | None = None
    provider_request_id: str | None = None
    attempts: int = 0
    poll_failures: int = 0
    error_code: str | None = None
    error_message: str | None = None
    output_urls: list[str] = field(default_factory=list)
    result_paths: list[str] = field(default_factory=list)
    result_file_ids: list[str] = field(default_factory=list)
    delivered_message_ids: list[int] = field(default_factory=list)
    cost_estimate_usd: float = 0.0
    started_at: str | None = None
    submitted_at: str | None = None
    deadline_at: str | None = None
    finished_at: str | None = None
    updated_at: str | None = None
    # schema 3: waiting out a Telegram outage (see Pipeline.park)
    deliver_after: str | None = None
    delivery_attempts: int = 0
    delivery_waiting_since: str | None = None
    # schema 7: what the user chose (style, shape, count) and what the job ran with
    style_id: str | None = None
    model: str | None = None  # vendor model ref; None = the provider's configured one
    prompt_suffix: str = ""  # the style's words, added to the prompt sent to the vendor
    shape: str | None = None
    images_asked: int | None = None  # None: a job made in code without a row (tests)
    images_delivered: int | None = None  # None until delivered
    images_withheld: int = 0  # asked for, but withheld by the provider's safety filter
    # schema 8 (issue 17): album edits, upscales, deleted results
    input_file_ids: list[str] = field(default_factory=list)  # every photo of an album edit
    source_index: int | None = None  # upscale: which image of parent_job_id
    deleted_at: str | None = None  # 🗑 Delete removed the result messages
    deleted_by: int | None = None
    # schema 10: the catalog the job's texts are in (its requester's language); None: English
    language: str | None = None
    # schema 11 (issue 16): the process running it, and the fence its writes carry
    owner: str | None = None
    lease_token: int = 0
    rescues: int = 0

    @property
    def images_counted(self) -> int:
        """Images this job counts against caps: those delivered once known, else those asked."""
        if self.images_delivered is not None:
            return self.images_delivered
        return self.images_asked or 1


@dataclass(frozen=True, slots=True)
class NewJob:
    """What a handler asks the store to create."""

    kind: JobKind
    update_id: int
    chat_id: int
    user_id: int
    chat_type: str
    prompt: str
    provider: str
    params: dict[str, Any]
    cost_estimate_usd: float
    command_message_id: int | None = None
    input_file_id: str | None = None
    input_file_size: int | None = None
    input_width: int | None = None
    input_height: int | None = None
    parent_job_id: int | None = None
    style_id: str | None = None
    model: str | None = None
    prompt_suffix: str = ""
    shape: str | None = None
    images_asked: int = 1
    input_file_ids: tuple[str, ...] = ()  # an album edit: every photo, input_file_id first
    source_index: int | None = None  # upscale: which image of parent_job_id
    language: str | None = None  # the requester's language (texts.current_language())


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """A vendor-neutral request: the user's text, the operator's params, maybe an input image."""

    job_id: int
    kind: JobKind
    prompt: str
    params: dict[str, Any]
    image: bytes | None = None
    image_mime: str | None = None
    # an album edit's other photos, (bytes, MIME type) each, after `image`
    more_images: tuple[tuple[bytes, str], ...] = ()
    # where the vendor may POST when the request finishes (a wake-up, see hints.py)
    notify_url: str | None = None
    # the vendor model to run (a style's); None = the provider's configured model
    model: str | None = None


class PollState(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


@dataclass(frozen=True, slots=True)
class PollResult:
    """A vendor's answer about one request."""

    state: PollState
    output_urls: tuple[str, ...] = ()
    queue_position: int | None = None
    error: str | None = None
    error_code: str | None = None


@dataclass(frozen=True, slots=True)
class ImageFile:
    """A downloaded, checked image."""

    data: bytes
    mime: str
    width: int
    height: int

    @property
    def extension(self) -> str:
        return {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}.get(
            self.mime, "bin"
        )
