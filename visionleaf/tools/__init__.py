"""Tools the model can call between turns, and the parser of its turns.

Importing this package registers the built-in tools (``image_zoom_in_tool``, ``image_rotate_tool``).
"""

from visionleaf.tools import crop, rotate
from visionleaf.tools.base import (
    ERROR_PREFIX,
    TOOL_REGISTRY,
    Observation,
    Tool,
    ToolCall,
    ToolContext,
    ToolError,
    get_tool,
    register_tool,
    run_tool,
)
from visionleaf.tools.crop import map_box
from visionleaf.tools.parse import Turn, parse_turn

__all__ = [
    "ERROR_PREFIX",
    "TOOL_REGISTRY",
    "Observation",
    "Tool",
    "ToolCall",
    "ToolContext",
    "ToolError",
    "Turn",
    "crop",
    "get_tool",
    "map_box",
    "parse_turn",
    "register_tool",
    "rotate",
    "run_tool",
]
