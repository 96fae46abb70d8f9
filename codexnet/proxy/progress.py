"""One-line descriptions of what the agent is doing, from app-server items.

Shown in the chat's live view ("running `pytest -q`", "editing `src/app.py`").
"""

from __future__ import annotations

import shlex
from typing import Any, Final

MAX_STEP_CHARS: Final = 120


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_STEP_CHARS else text[: MAX_STEP_CHARS - 1] + "…"


def _unwrap_shell(command: str) -> str:
    """`/bin/bash -lc 'pytest -q'` → `pytest -q`: the wrapper is noise to a reader."""
    try:
        parts = shlex.split(command)
    except ValueError:
        return command
    if len(parts) == 3 and parts[0].endswith(("sh", "bash", "zsh")) and parts[1] in ("-lc", "-c"):
        return parts[2]
    return command


def describe_item(item: dict[str, Any]) -> str | None:
    """What an `item/started` item means to a person, or None to keep the old step."""
    kind = item.get("type")
    if kind == "commandExecution":
        actions = item.get("commandActions")
        command = None
        if isinstance(actions, list) and actions and isinstance(actions[0], dict):
            command = actions[0].get("command")
        command = command or _unwrap_shell(str(item.get("command") or ""))
        return f"running `{_clip(str(command))}`"
    if kind == "fileChange":
        changes = item.get("changes")
        paths = []
        if isinstance(changes, list):
            paths = [str(c.get("path")) for c in changes if isinstance(c, dict) and c.get("path")]
        if not paths:
            return "editing files"
        more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
        return f"editing `{_clip(paths[0])}`{more}"
    if kind == "reasoning":
        return "thinking"
    if kind == "agentMessage":
        return "writing the answer"
    if kind == "mcpToolCall":
        return f"calling `{_clip(str(item.get('server', '')))}.{_clip(str(item.get('tool', '')))}`"
    if kind == "webSearch":
        return f"searching the web for {_clip(str(item.get('query', '')))!r}"
    if kind in ("userMessage", None):
        return None
    return _clip(str(kind))
