"""A fake OpenAI Responses API (``POST /v1/responses``, SSE) for the real codex binary.

It speaks the subset that ``codex app-server`` 0.169.0 needs (see
/work/shared/notes/codex-app-server.md §9): ``response.created``,
``response.output_item.added``, ``response.output_text.delta``…,
``response.output_item.done`` and ``response.completed`` with usage.

The reply is chosen from a directive in the *last real user prompt* of the
request's ``input`` (the ``<environment_context>`` and similar injected user
messages are ignored):

=====================  ==============================================================
(none)                 ``Echo: <prompt> (turn N)``, N = real user prompts in ``input``
``[[reply:TEXT]]``     exactly TEXT
``[[slow:N]]``         N deltas ``tick i `` about 0.5 s apart, then completes
``[[long:N]]``         N characters of deterministic text with lines and paragraphs
``[[markdown]]``       ``MARKDOWN_SAMPLE`` (bold, italic, inline code, link, fenced code)
``[[shell:CMD]]``      a function call running CMD with the advertised shell tool;
                       once the last input item is its ``function_call_output``:
                       ``Command output: <the Output: section, or the last line>``
                       (``(no output)`` when the Output: section is empty)
``[[addfile:NAME]]``   an ``apply_patch`` (through the shell tool) adding file NAME with
                       one line ``hello from the model``; the turn then has a diff;
                       afterwards: ``Added NAME``
``[[http500]]``        HTTP 500 with a JSON error body
``[[http400]]``        HTTP 400 with a JSON error body
``[[failed]]``         ``response.failed`` (code ``server_error``)
``[[truncate]]``       one delta, then the stream ends without ``response.completed``
=====================  ==============================================================

``FakeResponsesAPI.script(fn)`` installs a hook that runs before the
directives: ``fn(request)`` returns a ``str`` (answer text), a ``Reply``
(``TextReply``/``ToolCall``/``HttpError``/``Failed``/``Truncated``) or ``None``
to fall back to the directives. Every request is kept in ``requests``
(``RecordedRequest``: headers, parsed body, prompt helpers, ``disconnected``);
``await wait_requests(n)`` and ``await request.wait_ended()`` wait without polling.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import trio

from .httpserver import Request, Response, serve_http

SLOW_TICK_SECONDS = 0.5

MARKDOWN_SAMPLE = (
    "# Sample\n"
    "\n"
    "Some **bold** text, some _italic_ text and `inline code`.\n"
    "\n"
    "- a [link](https://example.com)\n"
    "- a second item\n"
    "\n"
    "```python\n"
    "def greet(name: str) -> str:\n"
    '    return f"Hello, {name}!"\n'
    "```\n"
    "\n"
    "Done."
)

_LONG_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()

# User-role messages that Codex injects itself (not typed by the user).
_INJECTED_PREFIXES = (
    "<environment_context>",
    "<user_instructions>",
    "<user_shell_command>",
    "<turn_aborted>",
    "<subagent_notification>",
    "# AGENTS.md instructions",
)

_DIRECTIVE = re.compile(
    r"\[\[(?P<name>reply|slow|long|markdown|shell|addfile|http500|http400|failed|truncate)"
    r"(?::(?P<arg>.*?))?\]\]",
    re.DOTALL,
)


# ------------------------------------------------------------------------ replies


@attrs.frozen
class TextReply:
    """An assistant message. `deltas` (if given) must concatenate to `text`."""

    text: str
    deltas: tuple[str, ...] | None = None
    delay: float = 0.0  # seconds before each delta after the first


@attrs.frozen
class ToolCall:
    """A function call; `arguments` is JSON-encoded for the wire."""

    name: str
    arguments: dict[str, Any]
    call_id: str | None = None


@attrs.frozen
class HttpError:
    status: int
    message: str = "mock error"


@attrs.frozen
class Failed:
    """An SSE `response.failed` event."""

    code: str = "server_error"
    message: str = "mock response.failed"


@attrs.frozen
class Truncated:
    """Some deltas, then the stream closes without `response.completed`."""

    text: str = "partial "


Reply = TextReply | ToolCall | HttpError | Failed | Truncated
Script = Callable[["RecordedRequest"], "Reply | str | None"]


# ----------------------------------------------------------------------- requests


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") in ("input_text", "text", "output_text")
        )
    return ""


def _is_user_message(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and item.get("role") == "user"
        and item.get("type", "message") == "message"
    )


@attrs.define
class RecordedRequest:
    """One request Codex sent, with helpers to look into the Responses `input`."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    disconnected: bool = False  # the client went away before the stream ended
    _ended: trio.Event = attrs.field(factory=trio.Event, init=False, repr=False)

    @property
    def ended(self) -> bool:
        """The response was fully sent, or abandoned (see `disconnected`)."""
        return self._ended.is_set()

    async def wait_ended(self) -> None:
        """Block until the response was fully sent or the client went away."""
        await self._ended.wait()

    def _end(self, *, disconnected: bool) -> None:
        self.disconnected = disconnected
        self._ended.set()

    @property
    def input(self) -> list[Any]:
        items = self.body.get("input")
        return items if isinstance(items, list) else []

    @property
    def user_prompts(self) -> list[str]:
        """Texts of real user prompts in `input`, oldest first (injected context excluded)."""
        texts = (
            _content_text(item.get("content")) for item in self.input if _is_user_message(item)
        )
        return [t for t in texts if not t.lstrip().startswith(_INJECTED_PREFIXES)]

    @property
    def last_user_text(self) -> str:
        prompts = self.user_prompts
        return prompts[-1] if prompts else ""

    @property
    def last_item(self) -> dict[str, Any] | None:
        items = self.input
        return items[-1] if items and isinstance(items[-1], dict) else None

    @property
    def last_user_content(self) -> list[dict[str, Any]]:
        """The content items of the last real user message (text, input_image, …)."""
        for item in reversed(self.input):
            if _is_user_message(item):
                content = item.get("content")
                text = _content_text(content)
                if not text.lstrip().startswith(_INJECTED_PREFIXES) and isinstance(content, list):
                    return [c for c in content if isinstance(c, dict)]
        return []

    @property
    def images(self) -> list[str]:
        """The image_url of each image given with the last user message."""
        return [
            str(c.get("image_url", ""))
            for c in self.last_user_content
            if c.get("type") == "input_image"
        ]

    @property
    def cwd(self) -> str | None:
        """The working directory in the latest <environment_context> Codex sent."""
        found = None
        for item in self.input:
            if _is_user_message(item):
                match = re.search(r"<cwd>(.*?)</cwd>", _content_text(item.get("content")))
                if match:
                    found = match.group(1)
        return found

    @property
    def tool_names(self) -> list[str]:
        tools = self.body.get("tools")
        if not isinstance(tools, list):
            return []
        return [str(t["name"]) for t in tools if isinstance(t, dict) and "name" in t]


# ------------------------------------------------------------------------- server


class FakeResponsesAPI:
    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.port: int | None = None
        self._script: Script | None = None
        self._waiters: list[trio.Event] = []
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("FakeResponsesAPI.serve() has not started yet")
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, fn: Script | None) -> None:
        """Install (or with None, remove) a hook consulted before the directives."""
        self._script = fn

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on 127.0.0.1 until cancelled; `task_status.started(port)`."""
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(serve_http, self.handle)
            self.port = port
            task_status.started(port)

    async def wait_requests(self, n: int) -> list[RecordedRequest]:
        """Block until at least `n` requests were received; return the first `n`."""
        while len(self.requests) < n:
            event = trio.Event()
            self._waiters.append(event)
            await event.wait()
        return self.requests[:n]

    # ------------------------------------------------------------------ handling

    async def handle(self, request: Request) -> Response:
        if request.method != "POST" or request.path.rstrip("/") != "/v1/responses":
            return Response.json(404, {"error": {"message": f"no route {request.path}"}})
        try:
            body = request.json()
        except ValueError:
            return Response.json(400, {"error": {"message": "body is not JSON"}})
        if not isinstance(body, dict):
            return Response.json(400, {"error": {"message": "body is not an object"}})
        recorded = RecordedRequest(request.method, request.path, request.headers, body)
        self.requests.append(recorded)
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()

        reply = self.choose(recorded)
        if isinstance(reply, HttpError):
            recorded._end(disconnected=False)
            kind = "server_error" if reply.status >= 500 else "invalid_request_error"
            return Response.json(
                reply.status,
                {"error": {"message": reply.message, "type": kind, "code": None, "param": None}},
            )
        return Response(
            200,
            self._stream(recorded, reply),
            {"content-type": "text/event-stream", "cache-control": "no-cache"},
        )

    def choose(self, request: RecordedRequest) -> Reply:
        """The reply for `request`: the script hook first, then the directives."""
        if self._script is not None:
            scripted = self._script(request)
            if isinstance(scripted, str):
                return TextReply(scripted)
            if scripted is not None:
                return scripted
        prompt = request.last_user_text
        match = _DIRECTIVE.search(prompt)
        name = match["name"] if match else ""
        arg = (match["arg"] or "") if match else ""
        if name == "reply":
            return TextReply(arg)
        if name == "slow":
            n = _int(arg, 3)
            return TextReply(
                "".join(f"tick {i} " for i in range(1, n + 1)),
                tuple(f"tick {i} " for i in range(1, n + 1)),
                SLOW_TICK_SECONDS,
            )
        if name == "long":
            return TextReply(long_text(_int(arg, 5000)))
        if name == "markdown":
            return TextReply(MARKDOWN_SAMPLE)
        if name == "shell":
            last = request.last_item
            if last is not None and last.get("type") == "function_call_output":
                return TextReply(f"Command output: {_command_output(last.get('output'))}")
            return self._shell_call(request, arg)
        if name == "addfile":
            last = request.last_item
            if last is not None and last.get("type") == "function_call_output":
                return TextReply(f"Added {arg}")
            patch = (
                f"apply_patch <<'EOF'\n*** Begin Patch\n*** Add File: {arg}\n"
                "+hello from the model\n*** End Patch\nEOF\n"
            )
            return self._shell_call(request, patch)
        if name == "http500":
            return HttpError(500, "mock internal server error")
        if name == "http400":
            return HttpError(400, "mock bad request")
        if name == "failed":
            return Failed()
        if name == "truncate":
            return Truncated()
        return TextReply(f"Echo: {prompt} (turn {len(request.user_prompts)})")

    def _shell_call(self, request: RecordedRequest, cmd: str) -> ToolCall:
        tools = request.tool_names
        if "exec_command" in tools or not tools:
            return ToolCall("exec_command", {"cmd": cmd, "yield_time_ms": 1000})
        if "shell_command" in tools:
            return ToolCall("shell_command", {"command": cmd})
        if "shell" in tools:
            return ToolCall("shell", {"command": ["bash", "-lc", cmd]})
        return ToolCall("exec_command", {"cmd": cmd, "yield_time_ms": 1000})

    async def _stream(
        self, recorded: RecordedRequest, reply: TextReply | ToolCall | Failed | Truncated
    ) -> AsyncIterator[bytes]:
        seq = next(self._ids)
        resp_id = f"resp_{seq:06d}"
        finished = False
        try:
            yield _event(
                "response.created",
                response={"id": resp_id, "object": "response", "status": "in_progress"},
            )
            if isinstance(reply, Failed):
                yield _event(
                    "response.failed",
                    response={
                        "id": resp_id,
                        "object": "response",
                        "status": "failed",
                        "error": {"code": reply.code, "message": reply.message},
                    },
                )
            elif isinstance(reply, ToolCall):
                call_id = reply.call_id or f"call_{seq:012x}"
                yield _event(
                    "response.output_item.done",
                    output_index=0,
                    item={
                        "type": "function_call",
                        "id": f"fc_{seq:012x}",
                        "call_id": call_id,
                        "name": reply.name,
                        "arguments": json.dumps(reply.arguments),
                        "status": "completed",
                    },
                )
                yield _completed(resp_id, recorded, 10)
            else:
                item_id = f"msg_{seq:012x}"
                complete = not isinstance(reply, Truncated)
                deltas = reply.deltas if isinstance(reply, TextReply) else None
                delay = reply.delay if isinstance(reply, TextReply) else 0.0
                for pause, chunk in _message_events(item_id, reply.text, deltas, delay, complete):
                    if pause:
                        await trio.sleep(pause)
                    yield chunk
                if complete:
                    yield _completed(resp_id, recorded, len(reply.text) // 4 + 1)
            finished = True
        finally:
            recorded._end(disconnected=not finished)


# ------------------------------------------------------------------------ helpers


def _event(kind: str, **fields: Any) -> bytes:
    data = json.dumps({"type": kind, **fields}, ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()


def _message_events(
    item_id: str, text: str, deltas: tuple[str, ...] | None, delay: float, complete: bool
) -> list[tuple[float, bytes]]:
    """(pause before, SSE chunk) pairs for one assistant message."""
    item = {"type": "message", "id": item_id, "role": "assistant"}
    events = [
        (
            0.0,
            _event(
                "response.output_item.added",
                output_index=0,
                item={**item, "status": "in_progress", "content": []},
            ),
        )
    ]
    for i, delta in enumerate(deltas if deltas is not None else split_deltas(text)):
        chunk = _event(
            "response.output_text.delta",
            item_id=item_id,
            output_index=0,
            content_index=0,
            delta=delta,
        )
        events.append((delay if i else 0.0, chunk))
    if complete:
        done_item = {
            **item,
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        events.append((0.0, _event("response.output_item.done", output_index=0, item=done_item)))
    return events


def _completed(resp_id: str, recorded: RecordedRequest, output_tokens: int) -> bytes:
    input_tokens = max(1, len(json.dumps(recorded.input)) // 4)
    return _event(
        "response.completed",
        response={
            "id": resp_id,
            "object": "response",
            "status": "completed",
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            },
        },
    )


def _int(text: str, default: int) -> int:
    try:
        return max(0, int(text.strip()))
    except ValueError:
        return default


def _command_output(output: Any) -> str:
    """The `Output:` section of an exec_command result, else its last non-empty line."""
    if isinstance(output, list):  # content items
        output = "".join(str(p.get("text", "")) for p in output if isinstance(p, dict))
    elif isinstance(output, dict):
        output = str(output.get("content", output.get("output", "")))
    text = str(output or "")
    marker = "\nOutput:\n"
    if marker in text:
        return text.rsplit(marker, 1)[1].strip() or "(no output)"
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def split_deltas(text: str, pieces: int = 8) -> list[str]:
    """Split `text` into about `pieces` deltas on word boundaries (at least one)."""
    words = re.findall(r"\S+\s*|\s+", text)
    if not words:
        return [text]
    size = max(1, -(-len(words) // pieces))
    return ["".join(words[i : i + size]) for i in range(0, len(words), size)]


def long_text(n: int) -> str:
    """Exactly `n` characters of deterministic prose: 72-column lines, blank-line paragraphs."""
    out: list[str] = []
    length = 0
    words = itertools.cycle(_LONG_WORDS)
    paragraph = 1
    while length < n:
        lines = [f"Paragraph {paragraph}."]
        for _ in range(4):
            line = ""
            while len(line) < 60:
                line += next(words) + " "
            lines.append(line.rstrip())
        chunk = "\n".join(lines) + "\n\n"
        out.append(chunk)
        length += len(chunk)
        paragraph += 1
    text = "".join(out)[:n]
    if text and text[-1].isspace():
        text = text[:-1] + "."
    return text
