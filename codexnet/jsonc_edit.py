"""Add one member to an object of a person's JSONC file, keeping everything else.

A config file is the user's: comments, order, spacing and quoting stay as they
are. Rewriting it through a JSON serialiser would drop every comment, so
instead the new member is spliced in as text right after the opening brace of
the target object, followed by a comma (JSONC/JSON5 accept the trailing comma
this may leave). The caller re-parses the result and compares it with what it
expected, so a file this scanner misreads is refused rather than damaged.
"""

from __future__ import annotations

import json
from typing import Any


class EditError(Exception):
    """The file does not have the shape the edit needs; nothing was changed."""


class _Scanner:
    """Walks JSONC text, skipping whitespace, comments and strings."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_blank(self) -> None:
        text = self.text
        while self.pos < len(text):
            if text[self.pos].isspace():
                self.pos += 1
            elif text.startswith("//", self.pos):
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end + 1
            elif text.startswith("/*", self.pos):
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise EditError("unterminated /* comment")
                self.pos = end + 2
            else:
                return

    def peek(self) -> str:
        self.skip_blank()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def read_key(self) -> str:
        """A member name: a quoted string or a bare JSON5 identifier."""
        quote = self.peek()
        if quote in ('"', "'"):
            return self.read_string()
        start = self.pos
        while self.pos < len(self.text) and (
            self.text[self.pos].isalnum() or self.text[self.pos] in "_$"
        ):
            self.pos += 1
        if start == self.pos:
            raise EditError(f"expected a key at offset {start}")
        return self.text[start : self.pos]

    def read_string(self) -> str:
        quote = self.text[self.pos]
        start = self.pos
        self.pos += 1
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\":
                self.pos += 2
                continue
            self.pos += 1
            if char == quote:
                raw = self.text[start : self.pos]
                if quote == "'":  # good enough to compare names; values are never decoded
                    raw = '"' + raw[1:-1].replace('"', '\\"') + '"'
                try:
                    return str(json.loads(raw))
                except ValueError:
                    return raw[1:-1]
        raise EditError("unterminated string")

    def skip_value(self) -> None:
        """Skip one value of any kind (nested objects and arrays included)."""
        char = self.peek()
        if char in ('"', "'"):
            self.read_string()
            return
        if char in "{[":
            closing = {"{": "}", "[": "]"}
            stack = [closing[char]]
            self.pos += 1
            while stack:
                char = self.peek()
                if not char:
                    raise EditError("unbalanced brackets")
                if char in ('"', "'"):
                    self.read_string()
                elif char in "{[":
                    stack.append(closing[char])
                    self.pos += 1
                elif char in "}]":
                    if char != stack.pop():
                        raise EditError("unbalanced brackets")
                    self.pos += 1
                else:
                    self.pos += 1
            return
        # A number, true/false/null, or a bare word: up to the next separator.
        while (
            self.pos < len(self.text)
            and self.text[self.pos] not in ",}]/"
            and not (self.text[self.pos].isspace())
        ):
            self.pos += 1


def _line_indent(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    line = text[start:pos]
    return line[: len(line) - len(line.lstrip())]


def add_member(text: str, parent: str, name: str, value: Any) -> str:
    """`text` with `"name": value` added to the top-level object member `parent`.

    When the top-level object has no `parent` member, one is added holding
    only the new member. Raises `EditError` when the text is not an object or
    `parent` is not an object.
    """
    scanner = _Scanner(text)
    if scanner.peek() != "{":
        raise EditError("the file is not a JSON object")
    top_brace = scanner.pos
    scanner.pos += 1
    member = json.dumps(name) + ": " + json.dumps(value)
    while True:
        char = scanner.peek()
        if char == "}" or not char:
            break
        if char == ",":
            scanner.pos += 1
            continue
        key_start = scanner.pos
        key = scanner.read_key()
        if scanner.peek() != ":":
            raise EditError(f"expected ':' after {key!r}")
        scanner.pos += 1
        if key != parent:
            scanner.skip_value()
            continue
        if scanner.peek() != "{":
            raise EditError(f"{parent} is not an object")
        brace = scanner.pos
        indent = _line_indent(text, key_start) + "  "
        return text[: brace + 1] + f"\n{indent}{member}," + text[brace + 1 :]
    indent = "  "
    block = f"\n{indent}{json.dumps(parent)}: {{\n{indent}  {member},\n{indent}}},"
    return text[: top_brace + 1] + block + text[top_brace + 1 :]
