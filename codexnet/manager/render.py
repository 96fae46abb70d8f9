"""Agent Markdown → Telegram text + explicit entities, split into message-sized parts.

Explicit entities (no parse_mode) need no escaping, so Telegram can't answer "can't parse
entities" to arbitrary agent output. telegramify-markdown does the Markdown → (text, entities)
conversion. The splitter is our own: the library's `split_entities` counts UTF-16 units, but
Telegram's 4096 limit counts code points. It also cuts only at newlines and doesn't copy
Telegram's trimming.

Pure functions, no I/O.
"""

from __future__ import annotations

import itertools
import re
from bisect import bisect_left
from typing import Any, Final

import attrs
import pyromark  # telegramify's own parser; used to find the HTML/math spans it would eat
from telegramify_markdown import convert
from telegramify_markdown.config import RenderConfig
from telegramify_markdown.converter import STANDARD_OPTIONS

TELEGRAM_LIMIT: Final = 4096  # code points of the text after entity parsing

Entity = dict[str, Any]


@attrs.frozen
class Chunk:
    """Message text plus Bot API MessageEntity dicts (UTF-16 offsets), ready for JSON."""

    text: str
    entities: tuple[Entity, ...] = ()


def utf16_len(s: str) -> int:
    # surrogatepass: a lone surrogate counts as one unit instead of raising
    return len(s.encode("utf-16-le", "surrogatepass")) // 2


def _make_config() -> RenderConfig:
    # isolated(): the library's global config is shared mutable state.
    config = RenderConfig.isolated()
    symbols = config.markdown_symbol
    # Headings are already bold (H1/H2 also underlined); the default 📌/✏️/📚/🔖 prefixes add noise.
    symbols.heading_level_1 = symbols.heading_level_2 = ""
    symbols.heading_level_3 = symbols.heading_level_4 = ""
    return config


_CONFIG: Final = _make_config()
_MAX_PROTECT_PASSES: Final = 16


def _protect_literals(md: str) -> str:
    """Backslash-escape raw HTML and plain `$…$` so they show up literally.

    telegramify drops raw HTML (`Vec<String>` → `Vec`, `<details>` blocks vanish) and turns
    `$HOME/$USER` into code without the dollars. A coding agent means these literally. We ask
    the same parser which spans it reads as HTML or math and escape only those delimiters.
    Math containing a backslash (real LaTeX) is left for the library to turn into Unicode.
    We re-parse because once a block stops being HTML, the HTML inside it shows up as inline HTML.
    """
    for _ in range(_MAX_PROTECT_PASSES):
        data = md.encode()
        at: list[int] = []  # UTF-8 byte offsets that get a backslash
        for event, span in pyromark.events_with_range(md, options=STANDARD_OPTIONS):
            payload: object = event
            if not isinstance(payload, dict):
                continue
            start, end = span["start"], span["end"]
            if "InlineHtml" in payload or "Html" in payload:
                # one event per HTML-block line; only a line opening with a tag needs escaping
                first = start + len(data[start:end]) - len(data[start:end].lstrip(b" \t"))
                if data[first : first + 1] == b"<":
                    at.append(first)
            elif "InlineMath" in payload and "\\" not in payload["InlineMath"]:
                if data[start : start + 1] == b"$" and data[end - 1 : end] == b"$":
                    at += (start, end - 1)
        if not at:
            break
        bounds = [0, *sorted(set(at)), len(data)]
        md = b"\\".join(data[a:b] for a, b in itertools.pairwise(bounds)).decode()
    return md


def render_markdown(md: str) -> Chunk:
    """Render agent Markdown as text + entities, trimmed the way Telegram trims.

    Never raises: if the converter fails, or returns nothing for non-blank input, the raw text
    is sent without entities.
    """
    raw = _trim(Chunk(md))
    try:
        text, entities = convert(_protect_literals(md), config=_CONFIG)
        dicts = [e.to_dict() for e in entities]
    except Exception:  # Rust parser plus heuristics: a reply must still go out
        return raw
    size = utf16_len(text)
    # Telegram rejects the whole message for one bad entity, so drop any that fall outside the text.
    valid = tuple(d for d in dicts if d["length"] > 0 and 0 <= d["offset"] <= size - d["length"])
    chunk = _trim(Chunk(text, valid))
    return chunk if chunk.text or not raw.text else raw


# ---------------------------------------------------------------------------- splitting

# TDLib (fix_formatted_text) turns C0 controls into spaces and drops '\r'. It trims trailing
# whitespace in every case, and leading ' '/'\n' only up to the first entity. So every char
# <= U+0020 can be trimmed, and a `pre` entity at the start of a part keeps its indentation.
_WS: Final = "".join(map(chr, range(0x21)))
_H: Final = r"[\x00-\x09\x0b-\x20]"  # trimmable whitespace other than '\n'
# Cut points, best first: blank line, line end, run of spaces. Only characters Telegram trims
# count, so the separator costs nothing (a NBSP would not be trimmed).
_SEPARATORS: Final = (
    re.compile(rf"\n(?:{_H}*\n)+"),
    re.compile(r"\n+"),
    re.compile(rf"{_H}+"),
)

_Span = tuple[int, int, Entity]  # code-point [start, end) plus the original entity


def _spans(text: str, entities: tuple[Entity, ...]) -> tuple[list[int], list[_Span]]:
    """UTF-16 offset of every code-point index, and entities re-expressed in code points.

    We split in code points (Python indices, so a surrogate pair is never cut) and go back to
    UTF-16 only when writing a part's entities.
    """
    u16 = list(itertools.accumulate((2 if ord(c) > 0xFFFF else 1 for c in text), initial=0))

    def index(offset: int) -> int:  # clamped: a bad entity must not crash the splitter
        return min(bisect_left(u16, max(offset, 0)), len(text))

    spans = [(index(e["offset"]), index(e["offset"] + e["length"]), e) for e in entities]
    return u16, spans


def _part(text: str, u16: list[int], spans: list[_Span], start: int, end: int) -> Chunk:
    """text[start:end] as Telegram will store it: entities clipped, rebased, trimmed."""
    clipped = []
    for s, e, ent in spans:
        s, e = max(s, start), min(e, end)
        # Telegram drops entities that cover only whitespace
        if s < e and text[s:e].strip(_WS):
            clipped.append((s, e, ent))
    end = start + len(text[start:end].rstrip(_WS))
    # rtrim can't empty a kept entity (it holds a non-space), only shorten it
    clipped = [(s, min(e, end), ent) for s, e, ent in clipped]
    first_entity = min((s for s, _, _ in clipped), default=end)
    while start < first_entity and text[start] in _WS:
        start += 1
    base = u16[start]
    entities = sorted(
        ({**ent, "offset": u16[s] - base, "length": u16[e] - u16[s]} for s, e, ent in clipped),
        key=lambda d: (d["offset"], -d["length"]),
    )
    return Chunk(text[start:end], tuple(entities))


def _trim(chunk: Chunk) -> Chunk:
    u16, spans = _spans(chunk.text, chunk.entities)
    return _part(chunk.text, u16, spans, 0, len(chunk.text))


def _find_cut(text: str, pos: int, limit: int) -> int:
    """Where the part starting at `pos` should end (the next part starts there).

    A separator starting within (pos + limit/2, pos + limit] leaves at most `limit` code points
    before it, and Telegram trims the separator itself. We cut *after* it, so the next part
    starts without blank lines but keeps its indentation (code). Below half the limit we prefer
    a hard cut to a tiny message.
    """
    lo, hi = pos + max(1, limit // 2), pos + limit + 1
    for separator in _SEPARATORS:
        starts = [m.start() for m in separator.finditer(text, lo, hi)]
        if starts:
            whole = separator.match(text, starts[-1])  # endpos may have shortened the run
            assert whole is not None
            return whole.end()
    return pos + limit


def split_chunk(chunk: Chunk, limit: int = TELEGRAM_LIMIT) -> list[Chunk]:
    """Split into non-empty parts of at most `limit` code points each (after Telegram's trim).

    An entity crossing a cut, such as a `pre` block, is clipped into both parts with the same
    attributes (language, url), so each part re-opens it.
    """
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    text = chunk.text
    u16, spans = _spans(text, chunk.entities)
    # covered[i]: an entity covers code point i, so Telegram will not ltrim it
    depth = [0] * (len(text) + 1)
    for s, e, _ in spans:
        depth[s] += 1
        depth[e] -= 1
    covered = list(itertools.accumulate(depth))
    parts: list[Chunk] = []
    pos = 0
    while pos < len(text):
        # skip what Telegram would trim anyway, so the window starts at real content
        while pos < len(text) and text[pos] in _WS and not covered[pos]:
            pos += 1
        if pos == len(text):
            break
        cut = len(text) if len(text) - pos <= limit else _find_cut(text, pos, limit)
        part = _part(text, u16, spans, pos, cut)
        if part.text:
            parts.append(part)
        pos = cut
    return parts


def render_plain_parts(text: str, limit: int = TELEGRAM_LIMIT) -> list[str]:
    """Same splitting for plain text: the fallback when Telegram rejects our entities."""
    return [part.text for part in split_chunk(Chunk(text), limit)]
