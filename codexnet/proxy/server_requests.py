"""The app-server's questions to its client, as yes/no questions for a person.

Each supported server request is described once (`Approval`: what to show in
the chat) and answered once (`respond`: the person's decision in that
request's own response shape). The decisions are the command-approval ones:
`accept`, `acceptForSession`, `decline`, `cancel`.

Supported (codex 0.169.0, `codex app-server generate-json-schema`):

* `item/commandExecution/requestApproval`, `item/fileChange/requestApproval`
  → `{decision}`;
* `item/permissions/requestApproval` → `{permissions: <granted>, scope}`:
  approving grants what was asked, for the turn or the session; denying
  grants nothing;
* `mcpServer/elicitation/request` → `{action: accept|decline|cancel}`;
* legacy `execCommandApproval` / `applyPatchApproval` → `{decision: approved|…}`.

Anything else (`item/tool/requestUserInput`, `item/tool/call`, auth refresh,
attestation) is answered with a JSON-RPC error: codexnet cannot fill it in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import attrs


@attrs.frozen
class Approval:
    kind: str  # "command" | "file_change" | "permissions" | "elicitation"
    summary: str  # the command, or a one-line summary of what is asked
    detail: str  # cwd, reason, file list


@attrs.frozen
class _Kind:
    describe: Callable[[dict[str, Any]], Approval]
    respond: Callable[[str, dict[str, Any]], dict[str, Any]]


def _notes(params: dict[str, Any], *, cwd: bool = True) -> list[str]:
    notes = []
    if cwd and params.get("cwd"):
        notes.append(f"in {params['cwd']}")
    if params.get("reason"):
        notes.append(f"reason: {params['reason']}")
    return notes


def _describe_command(params: dict[str, Any]) -> Approval:
    command = params.get("command")
    if isinstance(command, list):  # the legacy request sends argv
        command = " ".join(str(c) for c in command)
    actions = params.get("commandActions")
    if isinstance(actions, list) and actions and isinstance(actions[0], dict):
        command = actions[0].get("command") or command  # without the `bash -lc` wrapper
    return Approval("command", str(command or "(unknown command)"), "; ".join(_notes(params)))


def _describe_file_change(params: dict[str, Any]) -> Approval:
    changes = params.get("changes") or params.get("fileChanges") or {}
    paths: list[str] = list(changes) if isinstance(changes, dict) else []
    if isinstance(changes, list):
        paths = [str(c.get("path")) for c in changes if isinstance(c, dict)]
    summary = f"change {len(paths)} file(s)" if paths else "apply a file change"
    notes = [", ".join(paths[:10])] if paths else []
    if params.get("grantRoot"):
        notes.append(f"and keep write access under {params['grantRoot']}")
    return Approval("file_change", summary, "; ".join(notes + _notes(params, cwd=False)))


def _describe_permissions(params: dict[str, Any]) -> Approval:
    asked = params.get("permissions") if isinstance(params.get("permissions"), dict) else {}
    assert isinstance(asked, dict)
    parts = []
    network = asked.get("network")
    if isinstance(network, dict) and network.get("enabled"):
        parts.append("network access")
    fs = asked.get("fileSystem")
    if isinstance(fs, dict):
        for mode in ("write", "read"):
            paths = fs.get(mode)
            if isinstance(paths, list) and paths:
                parts.append(f"{mode} access to {', '.join(str(p) for p in paths[:5])}")
        entries = fs.get("entries")
        if isinstance(entries, list) and entries:
            parts.append(f"{len(entries)} file system rule(s)")
    summary = "grant " + ("; ".join(parts) if parts else "extra sandbox permissions")
    return Approval("permissions", summary, "; ".join(_notes(params)))


def _describe_elicitation(params: dict[str, Any]) -> Approval:
    server = params.get("serverName") or "an MCP server"
    message = str(params.get("message") or "asks for confirmation")
    detail = f"open {params['url']}" if params.get("url") else ""
    return Approval("elicitation", f"{server}: {message}", detail)


def _decision(decision: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"decision": decision}


def _legacy_decision(decision: str, params: dict[str, Any]) -> dict[str, Any]:
    legacy = {"accept": "approved", "acceptForSession": "approved_for_session", "cancel": "abort"}
    return {"decision": legacy.get(decision, "denied")}


def _grant(decision: str, params: dict[str, Any]) -> dict[str, Any]:
    if decision not in ("accept", "acceptForSession"):
        return {"permissions": {}, "scope": "turn"}
    asked = params.get("permissions") if isinstance(params.get("permissions"), dict) else {}
    assert isinstance(asked, dict)
    granted = {k: asked[k] for k in ("fileSystem", "network") if asked.get(k) is not None}
    return {
        "permissions": granted,
        "scope": "session" if decision == "acceptForSession" else "turn",
    }


def _elicitation(decision: str, params: dict[str, Any]) -> dict[str, Any]:
    if decision in ("accept", "acceptForSession"):
        return {"action": "accept", "content": {}}
    return {"action": "cancel" if decision == "cancel" else "decline"}


SERVER_REQUESTS: Final[dict[str, _Kind]] = {
    "item/commandExecution/requestApproval": _Kind(_describe_command, _decision),
    "item/fileChange/requestApproval": _Kind(_describe_file_change, _decision),
    "item/permissions/requestApproval": _Kind(_describe_permissions, _grant),
    "mcpServer/elicitation/request": _Kind(_describe_elicitation, _elicitation),
    "execCommandApproval": _Kind(_describe_command, _legacy_decision),
    "applyPatchApproval": _Kind(_describe_file_change, _legacy_decision),
}


def describe(method: str, params: dict[str, Any]) -> Approval | None:
    kind = SERVER_REQUESTS.get(method)
    return kind.describe(params) if kind else None


def respond(method: str, decision: str, params: dict[str, Any]) -> dict[str, Any]:
    return SERVER_REQUESTS[method].respond(decision, params)
