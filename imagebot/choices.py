"""Styles, shapes and image counts: a user's choices resolved against the operator's config.

Users pick in plain words (a style's name, "Portrait", "2 images"); everything a choice maps
to (a model, a prompt suffix, vendor parameters, an aspect ratio, an output count) lives in
config and is resolved here, once, when a job is made. The job row records the result (style
id, model, suffix, shape, count, merged params), so a restart resumes with the same model.

A generate job's parameters are `generate.params`, then the style's `params` over them
(clamped as config clamps), then the shape's aspect ratio and the image count. With no
`[[styles]]` and no choice made, they are exactly `generate.params`, as before styles existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagebot.config import ParamValue, Settings, StyleSettings, clamp_params
from imagebot.models import JobKind
from imagebot.store.prefs import Prefs

# the vendor parameter an image count goes to (FLUX on Replicate; fal's apps use num_images)
_COUNT_KEYS = ("num_outputs", "num_images")
MAX_IMAGES = 4  # what FLUX and nano-banana take


@dataclass(frozen=True, slots=True)
class Resolved:
    """What one job runs with."""

    style_id: str | None
    style_name: str | None
    model: str | None  # vendor model ref; None = the provider's own (edits, the local provider)
    prompt_suffix: str
    shape: str | None  # a [generate.shapes] name; None = the operator's default
    images: int
    params: dict[str, ParamValue]


class Choices:
    """The operator's menu (styles, shapes, counts) and its resolution for a job."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def styles(self) -> list[StyleSettings]:
        return list(self.settings.styles)

    @property
    def shapes(self) -> dict[str, str]:
        return dict(self.settings.generate.shapes)

    @property
    def max_images(self) -> int:
        return min(MAX_IMAGES, self.settings.generate.most_images)

    @property
    def counts_images(self) -> bool:
        """Whether any request may make more than one image (then caps read as images)."""
        return max(self.max_images, self.settings.edit.outputs_per_job) > 1

    def default_count(self, kind: JobKind) -> int:
        op = self.settings.operation(kind)
        return max(1, min(MAX_IMAGES, op.outputs_per_job))

    def style_name(self, style_id: str | None) -> str | None:
        """A recorded style's name for captions (None without styles or once removed)."""
        found = next((s for s in self.settings.styles if s.id == style_id), None)
        return found.name if found else None

    def current(self, prefs: Prefs) -> tuple[StyleSettings | None, str | None, int]:
        """The style, shape and count a user's next /generate gets (defaults filled in)."""
        style = self.settings.style(prefs.style_id)
        shape = prefs.shape if prefs.shape in self.settings.generate.shapes else None
        count = self._count(JobKind.GENERATE, prefs.image_count)
        return style, shape, count

    def default_shape(self) -> str | None:
        """The shape whose ratio the operator's params already ask for, if one does."""
        ratio = self.settings.generate.params.get("aspect_ratio")
        return next((n for n, r in self.settings.generate.shapes.items() if r == ratio), None)

    def _count(self, kind: JobKind, wanted: int | None) -> int:
        if kind is not JobKind.GENERATE or wanted is None:
            return self.default_count(kind)
        return max(1, min(self.max_images, wanted))

    def resolve(
        self,
        kind: JobKind,
        prefs: Prefs,
        *,
        style_id: str | None = None,
        shape: str | None = None,
        count: int | None = None,
    ) -> Resolved:
        """What a new job runs with: the given style/shape/count (a remix or a shape button
        keeps a job's own; shape "" is the default shape), else the user's stored choices,
        else the operator's defaults."""
        if kind is not JobKind.GENERATE:  # an edit or an upscale: the operator's params
            op = self.settings.operation(kind)
            return Resolved(None, None, None, "", None, self.default_count(kind), dict(op.params))
        generate = self.settings.generate
        style = self.settings.style(style_id or prefs.style_id)
        params: dict[str, Any] = dict(generate.params)
        if style is not None:
            params = clamp_params({**params, **style.params})
        shape = prefs.shape if shape is None else shape  # "": the default, whatever prefs say
        if shape not in generate.shapes:
            shape = None
        if shape is not None:
            params["aspect_ratio"] = generate.shapes[shape]
        images = self._count(kind, count if count is not None else prefs.image_count)
        key = next((k for k in _COUNT_KEYS if k in params), None)
        if key is not None or images != 1:
            params[key or _COUNT_KEYS[0]] = images
        model = None
        if generate.provider == "replicate":
            model = style.model if style and style.model else self.settings.replicate.model
        return Resolved(
            style_id=style.id if style else None,
            style_name=style.name if style else None,
            model=model,
            prompt_suffix=style.prompt_suffix if style else "",
            shape=shape,
            images=images,
            params=params,
        )
