"""Updates from the Bot API, checked at the boundary before anything reads them.

Telegram sends well-formed JSON, but the bot must not depend on it: a proxy in
between, a bug on either side, or a field whose type changes would otherwise
raise deep inside a handler (`'str' object has no attribute 'get'`) and take
the poll loop down with the rest of its batch. So each update is rebuilt from
the few fields the bot reads, each of the type it reads it as:

* ids are ints (not bools), within SQLite's 64 bits (the journal stores them);
* strings have no lone surrogates (JSON's `"\\ud800"` decodes to one, and
  neither SQLite nor a UTF-8 log can take it): they become U+FFFD;
* anything else wrong — a `message` that is not an object, a chat without an
  id — raises `Malformed` with one line saying what, and the update is
  skipped (its `update_id`, if it has one, still moves the offset on).

The result is a plain dict with only those fields, so the handlers keep
reading `update["message"]["chat"]["id"]` without guarding every step.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any, Final

MAX_INT: Final = 2**63 - 1  # SQLite's INTEGER
MIN_INT: Final = -(2**63)
_SURROGATES: Final = re.compile("[\ud800-\udfff]")

# For the log line about a malformed update: short, and escaped (repr turns a
# newline or a control character into `\n`, `\x1b`), so it cannot forge a line.
_excerpt = reprlib.Repr()
_excerpt.maxlevel = 3
_excerpt.maxdict = _excerpt.maxlist = 6
_excerpt.maxstring = _excerpt.maxother = 80


class Malformed(Exception):
    """What is wrong with an update, in one line."""


def excerpt(value: object) -> str:
    return _excerpt.repr(value)


def safe_text(value: str) -> str:
    """`value` with every lone surrogate replaced by U+FFFD."""
    return _SURROGATES.sub("\ufffd", value) if _SURROGATES.search(value) else value


def update_id_of(raw: object) -> int | None:
    """The update's id if it has a usable one (it moves the offset on, valid or not)."""
    if isinstance(raw, dict):
        value = raw.get("update_id")
        if type(value) is int and 0 <= value <= MAX_INT:
            return value
    return None


def parse_update(raw: object) -> dict[str, Any]:
    """The update with only the fields the bot reads, checked; raises `Malformed`."""
    if not isinstance(raw, dict):
        raise Malformed(f"not an object but {type(raw).__name__}")
    update_id = update_id_of(raw)
    if update_id is None:
        raise Malformed("no valid update_id")
    update: dict[str, Any] = {"update_id": update_id}
    if "message" in raw:
        update["message"] = _message(raw["message"], "message")
    elif "callback_query" in raw:
        update["callback_query"] = _callback(raw["callback_query"])
    return update  # any other kind: nothing the bot reads (allowed_updates asks for these two)


def _wrong(value: object, where: str, expected: str) -> Malformed:
    if value is None:
        return Malformed(f"{where} is missing")
    return Malformed(f"{where} is not {expected} but {type(value).__name__}")


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _wrong(value, where, "an object")
    return value


def _int(value: object, where: str) -> int:
    if type(value) is not int:
        raise _wrong(value, where, "an integer")
    assert isinstance(value, int)
    if not MIN_INT <= value <= MAX_INT:
        raise Malformed(f"{where} is out of range")
    return value


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _wrong(value, where, "a string")
    return safe_text(value)


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _wrong(value, where, "a boolean")
    return value


def _optional(raw: dict[str, Any], key: str, where: str, check: Any) -> dict[str, Any]:
    """{key: checked value} if `raw` has it (and it is not null), else {}."""
    if raw.get(key) is None:
        return {}
    return {key: check(raw[key], f"{where}.{key}")}


def _user(value: object, where: str) -> dict[str, Any]:
    raw = _object(value, where)
    user = {"id": _int(raw.get("id"), f"{where}.id")}
    user |= _optional(raw, "username", where, _str)
    user |= _optional(raw, "first_name", where, _str)
    return user


def _chat(value: object, where: str) -> dict[str, Any]:
    raw = _object(value, where)
    chat: dict[str, Any] = {"id": _int(raw.get("id"), f"{where}.id")}
    chat |= _optional(raw, "type", where, _str)
    return chat


def _document(value: object, where: str) -> dict[str, Any]:
    raw = _object(value, where)
    document = {"file_id": _str(raw.get("file_id"), f"{where}.file_id")}
    document |= _optional(raw, "file_name", where, _str)
    document |= _optional(raw, "file_size", where, _int)
    document |= _optional(raw, "mime_type", where, _str)
    return document


def _photo(value: object, where: str) -> list[dict[str, Any]]:
    """The sizes of a photo (PhotoSize objects), each checked."""
    if not isinstance(value, list):
        raise _wrong(value, where, "a list")
    sizes = []
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        raw = _object(item, at)
        size = {"file_id": _str(raw.get("file_id"), f"{at}.file_id")}
        for key in ("width", "height", "file_size"):
            size |= _optional(raw, key, at, _int)
        sizes.append(size)
    return sizes


def _message(value: object, where: str) -> dict[str, Any]:
    raw = _object(value, where)
    message = {"chat": _chat(raw.get("chat"), f"{where}.chat")}
    message |= _optional(raw, "message_id", where, _int)
    message |= _optional(raw, "from", where, _user)
    message |= _optional(raw, "text", where, _str)
    # Forum topics: the topic a message is in (with is_topic_message; without
    # it a message_thread_id is a reply thread, not a topic).
    message |= _optional(raw, "message_thread_id", where, _int)
    message |= _optional(raw, "is_topic_message", where, _bool)
    # Files: a document or a photo, its caption the prompt; an album's parts
    # share a media_group_id.
    message |= _optional(raw, "document", where, _document)
    message |= _optional(raw, "photo", where, _photo)
    message |= _optional(raw, "caption", where, _str)
    message |= _optional(raw, "media_group_id", where, _str)
    return message


def _callback(value: object) -> dict[str, Any]:
    raw = _object(value, "callback_query")
    query = {"id": _str(raw.get("id"), "callback_query.id")}
    query |= _optional(raw, "from", "callback_query", _user)
    query |= _optional(raw, "data", "callback_query", _str)
    # The message the button is under; absent when it is too old for Telegram
    # to include (then the press belongs to no chat, and is refused as stale).
    query |= _optional(raw, "message", "callback_query", _message)
    return query
