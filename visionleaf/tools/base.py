"""Tool contract and registry: a tool is a name, a JSON schema and an ``execute`` function.

A tool never crashes a rollout: :func:`run_tool` turns every failure (unknown name, bad arguments,
an exception inside the tool) into an :class:`Observation` whose text starts with ``Error:``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from visionleaf.boxes import Box
from visionleaf.registry import Registry

ERROR_PREFIX = "Error:"


class ToolError(ValueError):
    """Raised inside a tool for a bad call; :func:`run_tool` turns it into an ``Error:`` observation."""


@dataclass(frozen=True)
class ToolCall:
    """One parsed ``<tool_call>``."""

    name: str
    """Tool name as the model wrote it."""
    arguments: Mapping[str, Any]
    """Decoded JSON arguments (not validated: each tool validates its own)."""


@dataclass(frozen=True)
class ToolContext:
    """What a tool may read about the trajectory it runs in."""

    original_image: Image.Image
    """Full-resolution original image; crops are cut from it (LFPC's information gap)."""
    model_size: tuple[int, int]
    """(width, height) of the global view as the model sees it, after the processor's resize; the
    coordinate space of ``bbox_2d``."""
    crop_min_pixels: int = 28 * 28 * 4
    """Smallest pixel count a returned image is resized to (smart-resize rule)."""
    crop_max_pixels: int = 28 * 28 * 1024
    """Largest pixel count a returned image is resized to (smart-resize rule)."""


@dataclass(frozen=True)
class Observation:
    """What a tool returns: shown to the model as a ``<tool_response>`` turn (response_mask 0)."""

    ok: bool
    """False for every failure; the text then starts with ``Error:``."""
    text: str = ""
    """Text part of the observation."""
    images: tuple[Image.Image, ...] = ()
    """Returned images (RGB), already resized to the crop pixel budget."""
    box: Box | None = None
    """For crops: the box actually cut, in original-image pixels (x1, y1, x2, y2)."""

    @classmethod
    def error(cls, reason: str) -> Observation:
        return cls(ok=False, text=f"{ERROR_PREFIX} {reason}")


ToolFn = Callable[[Mapping[str, Any], ToolContext], Observation]


@dataclass(frozen=True)
class Tool:
    """A registered tool."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    """JSON schema of the arguments object."""
    execute: ToolFn = field(repr=False)

    def schema(self) -> dict[str, Any]:
        """OpenAI/Qwen function schema, as listed inside ``<tools></tools>`` in the system prompt."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


TOOL_REGISTRY: Registry[Tool] = Registry("tool")
get_tool = TOOL_REGISTRY.get
"""The registered tool of a name; a ``KeyError`` lists the valid names on a miss."""


def register_tool(name: str, description: str, parameters: Mapping[str, Any]) -> Callable[[ToolFn], ToolFn]:
    """Decorator: register ``fn(arguments, context) -> Observation`` as tool ``name``."""

    def decorator(fn: ToolFn) -> ToolFn:
        if name in TOOL_REGISTRY and get_tool(name).execute is not fn:
            raise ValueError(f"tool {name!r} is already registered; pick another name")
        if name not in TOOL_REGISTRY:
            TOOL_REGISTRY.register(name)(Tool(name=name, description=description, parameters=parameters, execute=fn))
        return fn

    return decorator


def run_tool(call: ToolCall, context: ToolContext, allowed: tuple[str, ...] | None = None) -> Observation:
    """Execute ``call``; never raises. Every failure becomes an ``Error:`` observation.

    ``allowed`` restricts the tools the model was offered (names outside it are unknown to the model).
    """
    names = tuple(TOOL_REGISTRY) if allowed is None else allowed
    if call.name not in names or call.name not in TOOL_REGISTRY:
        return Observation.error(f"unknown tool {call.name!r}; available tools: {', '.join(names)}")
    try:
        return get_tool(call.name).execute(call.arguments, context)
    except ToolError as exc:
        return Observation.error(str(exc))
    except Exception as exc:  # a tool bug must not crash the rollout; it is reported as an observation
        return Observation.error(f"tool {call.name!r} failed: {type(exc).__name__}: {exc}")
