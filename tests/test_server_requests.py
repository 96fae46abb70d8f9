"""App-server questions → what the chat shows, and decisions → the response shape."""

from __future__ import annotations

import pytest

from codexnet.proxy.server_requests import Approval, describe, respond

COMMAND = {
    "threadId": "t",
    "turnId": "u",
    "itemId": "call_1",
    "cwd": "/srv/work",
    "command": "/bin/bash -lc 'pytest -q'",
    "commandActions": [{"type": "unknown", "command": "pytest -q"}],
    "reason": "run the tests",
}
PERMISSIONS = {
    "threadId": "t",
    "turnId": "u",
    "itemId": "i",
    "cwd": "/srv/work",
    "permissions": {"network": {"enabled": True}, "fileSystem": {"write": ["/srv/cache"]}},
}


def test_command_shows_the_command_without_the_shell_wrapper() -> None:
    assert describe("item/commandExecution/requestApproval", COMMAND) == Approval(
        "command", "pytest -q", "in /srv/work; reason: run the tests"
    )


@pytest.mark.parametrize("decision", ["accept", "acceptForSession", "decline", "cancel"])
def test_command_decisions_pass_through(decision: str) -> None:
    method = "item/commandExecution/requestApproval"
    assert respond(method, decision, COMMAND) == {"decision": decision}


def test_legacy_requests_use_their_own_words() -> None:
    params = {"conversationId": "t", "command": ["ls", "-la"], "cwd": "/w"}
    assert describe("execCommandApproval", params) == Approval("command", "ls -la", "in /w")
    assert respond("execCommandApproval", "accept", params) == {"decision": "approved"}
    assert respond("execCommandApproval", "decline", params) == {"decision": "denied"}
    assert respond("applyPatchApproval", "acceptForSession", params) == {
        "decision": "approved_for_session"
    }


def test_file_change_summarises_the_paths() -> None:
    params = {
        "threadId": "t",
        "changes": [{"path": "src/app.py"}, {"path": "README.md"}],
        "reason": "fix the bug",
    }
    assert describe("item/fileChange/requestApproval", params) == Approval(
        "file_change", "change 2 file(s)", "src/app.py, README.md; reason: fix the bug"
    )


def test_permissions_grant_what_was_asked_or_nothing() -> None:
    method = "item/permissions/requestApproval"
    approval = describe(method, PERMISSIONS)
    assert approval is not None
    assert approval.summary == "grant network access; write access to /srv/cache"
    asked = PERMISSIONS["permissions"]
    assert respond(method, "accept", PERMISSIONS) == {"permissions": asked, "scope": "turn"}
    assert respond(method, "acceptForSession", PERMISSIONS) == {
        "permissions": asked,
        "scope": "session",
    }
    assert respond(method, "decline", PERMISSIONS) == {"permissions": {}, "scope": "turn"}


def test_elicitation_maps_to_actions() -> None:
    method = "mcpServer/elicitation/request"
    params = {
        "threadId": "t",
        "serverName": "github",
        "message": "Open a PR?",
        "mode": "form",
        "requestedSchema": {"type": "object", "properties": {}},
    }
    assert describe(method, params) == Approval("elicitation", "github: Open a PR?", "")
    assert respond(method, "accept", params) == {"action": "accept", "content": {}}
    assert respond(method, "decline", params) == {"action": "decline"}
    assert respond(method, "cancel", params) == {"action": "cancel"}


def test_unsupported_requests_are_not_described() -> None:
    assert describe("item/tool/requestUserInput", {"threadId": "t"}) is None
