"""Tests for codexnet.manager.render: Markdown → text + entities, and splitting at the limit."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest

from codexnet.manager import render
from codexnet.manager.render import (
    Chunk,
    render_markdown,
    render_plain_parts,
    split_chunk,
    utf16_len,
)

_WS = "".join(map(chr, range(0x21)))


def covered(text: str, entity: dict[str, Any]) -> str:
    """The text an entity covers, sliced in UTF-16 as Telegram does."""
    units = text.encode("utf-16-le", "surrogatepass")
    start, end = 2 * entity["offset"], 2 * (entity["offset"] + entity["length"])
    return units[start:end].decode("utf-16-le", "surrogatepass")


def by_type(chunk: Chunk) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for e in chunk.entities:
        found.setdefault(e["type"], []).append(covered(chunk.text, e))
    return found


def assert_well_formed(part: Chunk, limit: int) -> None:
    assert part.text
    assert len(part.text) <= limit
    assert part.text == part.text.rstrip(_WS)
    size = utf16_len(part.text)
    for e in part.entities:
        assert e["length"] > 0
        assert 0 <= e["offset"]
        assert e["offset"] + e["length"] <= size


def locate(original: str, parts: list[Chunk]) -> list[int]:
    """Code-point start of each part in `original`; only whitespace may lie between parts."""
    starts, cursor = [], 0
    for part in parts:
        at = original.find(part.text, cursor)
        assert at >= 0, part.text[:40]
        assert not original[cursor:at].strip(_WS)
        starts.append(at)
        cursor = at + len(part.text)
    assert not original[cursor:].strip(_WS)
    return starts


# ---------------------------------------------------------------------------- rendering


def test_inline_entities_and_no_markers() -> None:
    chunk = render_markdown(
        "Plain **bold** and *italic*, ~~gone~~, `x = 1` and [the docs](https://example.com/a)."
    )
    assert chunk.text == "Plain bold and italic, gone, x = 1 and the docs."
    found = by_type(chunk)
    assert found == {
        "bold": ["bold"],
        "italic": ["italic"],
        "strikethrough": ["gone"],
        "code": ["x = 1"],
        "text_link": ["the docs"],
    }
    (link,) = (e for e in chunk.entities if e["type"] == "text_link")
    assert link["url"] == "https://example.com/a"
    for marker in ("**", "__", "~~", "`", "]("):
        assert marker not in chunk.text


def test_blocks_heading_code_quote_list() -> None:
    md = (
        "# Result\n\nSome __underscored bold__ text.\n\n"
        "```python\ndef f():\n    return 1\n```\n\n"
        "> quoted line\n\n- one\n- two\n"
    )
    chunk = render_markdown(md)
    found = by_type(chunk)
    assert found["bold"] == ["Result", "underscored bold"]
    assert found["pre"] == ["def f():\n    return 1"]
    assert found["blockquote"] == ["quoted line"]
    (pre,) = (e for e in chunk.entities if e["type"] == "pre")
    assert pre["language"] == "python"
    assert "\n⦁ one\n⦁ two" in chunk.text  # list items keep one line each
    for marker in ("**", "__", "```", "# ", "> "):
        assert marker not in chunk.text


def test_astral_characters_shift_utf16_offsets() -> None:
    chunk = render_markdown("😀😀 **bold** 𝕏 `code` [l](https://e.x)")
    assert chunk.text == "😀😀 bold 𝕏 code l"
    offsets = {e["type"]: (e["offset"], e["length"]) for e in chunk.entities}
    # two emoji = 4 UTF-16 units + space; 𝕏 is astral too
    assert offsets["bold"] == (5, 4)
    assert offsets["code"] == (13, 4)
    assert offsets["text_link"] == (18, 1)
    assert by_type(chunk) == {"bold": ["bold"], "code": ["code"], "text_link": ["l"]}


def test_html_and_dollars_stay_literal() -> None:
    chunk = render_markdown("Return `Vec<u8>` or Vec<String>, see <details> and $HOME/$USER.")
    assert chunk.text == "Return Vec<u8> or Vec<String>, see <details> and $HOME/$USER."
    assert by_type(chunk) == {"code": ["Vec<u8>"]}


def test_output_is_trimmed_like_telegram() -> None:
    chunk = render_markdown("\n\n- a\n- b\n\n")
    assert chunk.text == "⦁ a\n⦁ b"
    assert render_markdown("   ") == Chunk("", ())


def test_falls_back_to_raw_text(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("parser exploded")

    monkeypatch.setattr(render, "convert", boom)
    assert render_markdown("  **odd** input\n") == Chunk("**odd** input", ())


def test_unbalanced_markup_does_not_raise() -> None:
    for md in ["**open", "```\nunclosed fence", "[x](", "<", "$", "||", "\x00\r\n"]:
        chunk = render_markdown(md)
        for part in split_chunk(chunk):
            assert_well_formed(part, 4096)


# ---------------------------------------------------------------------------- splitting


def test_short_chunk_is_one_part() -> None:
    chunk = render_markdown("hello **world**")
    assert split_chunk(chunk) == [chunk]
    assert split_chunk(Chunk("  \n ")) == []


def test_long_answer_splits_at_paragraphs() -> None:
    rng = random.Random(7)
    paragraphs = [
        " ".join(f"word{rng.randrange(1000)}" for _ in range(rng.randrange(20, 120)))
        + f" **point {i}**."
        for i in range(120)
    ]
    chunk = render_markdown("\n\n".join(paragraphs))
    assert len(chunk.text) > 10_000
    parts = split_chunk(chunk)
    assert len(parts) >= 3
    starts = locate(chunk.text, parts)
    for part, start in zip(parts, starts, strict=True):
        assert_well_formed(part, 4096)
        end = start + len(part.text)
        # every cut falls on a blank line
        assert chunk.text[end:].startswith("\n\n") or end == len(chunk.text)
        assert all(re.fullmatch(r"point \d+", b) for b in by_type(part)["bold"])
    assert " ".join(p.text for p in parts).split() == chunk.text.split()


def test_long_code_block_reopens_pre_in_each_part() -> None:
    lines = [f"    value_{i:04d} = compute({i})  # step" for i in range(180)]
    code = "\n".join(lines)
    assert len(code) > 6000
    chunk = render_markdown(f"Here:\n\n```python\n{code}\n```\n\nDone.")
    parts = split_chunk(chunk)
    assert len(parts) == 2
    pieces = []
    for part in parts:
        assert_well_formed(part, 4096)
        pres = [e for e in part.entities if e["type"] == "pre"]
        assert len(pres) == 1
        assert pres[0]["language"] == "python"
        pieces.append(covered(part.text, pres[0]))
    # cut at a line end; the second part keeps the indentation of its first line
    assert pieces[1].startswith("    value_")
    assert "\n".join(pieces) == code


def test_hard_cut_without_separators() -> None:
    chunk = Chunk("x" * 10_000, ({"type": "bold", "offset": 0, "length": 10_000},))
    parts = split_chunk(chunk)
    assert [len(p.text) for p in parts] == [4096, 4096, 1808]
    assert all(p.entities == ({"type": "bold", "offset": 0, "length": len(p.text)},) for p in parts)


def test_limit_counts_code_points_not_utf16() -> None:
    smileys = "\U0001f600" * 4096
    assert utf16_len(smileys) == 8192
    (part,) = split_chunk(Chunk(smileys, ({"type": "bold", "offset": 0, "length": 8192},)))
    assert part.text == smileys
    assert part.entities[0]["length"] == 8192
    parts = split_chunk(Chunk(smileys + "\U0001f600"))
    assert [len(p.text) for p in parts] == [4096, 1]


def test_entities_rebased_after_astral_text() -> None:
    text = "\U0001f600" * 30 + "\n\n" + "\U0001f600" * 5 + "abc"
    chunk = Chunk(text, ({"type": "code", "offset": 60 + 2 + 10, "length": 3},))
    first, second = split_chunk(chunk, limit=35)
    assert first == Chunk("\U0001f600" * 30, ())
    assert second.entities == ({"type": "code", "offset": 10, "length": 3},)
    assert covered(second.text, second.entities[0]) == "abc"


def test_leading_whitespace_kept_inside_entity_only() -> None:
    # Telegram ltrims only before the first entity, so code indentation survives a cut
    text = "intro\n\n" + "   indented"
    pre = {"type": "pre", "offset": 7, "length": 11, "language": "sh"}
    first, second = split_chunk(Chunk(text, (pre,)), limit=11)
    assert first.text == "intro"
    assert second == Chunk("   indented", ({**pre, "offset": 0},))
    assert render_plain_parts(text, limit=11) == ["intro", "indented"]


def test_render_plain_parts() -> None:
    text = ("alpha beta gamma\n" * 400).strip()
    parts = render_plain_parts(text, limit=1000)
    assert all(0 < len(p) <= 1000 for p in parts)
    assert "\n".join(parts) == text
    with pytest.raises(ValueError, match="limit"):
        render_plain_parts("x", limit=0)


_PIECES = [
    "word",
    "longerword",
    "😀",
    "𝕏y",
    "é",
    " ",
    "  ",
    "\n",
    "\n\n",
    "**bold text**",
    "*it*",
    "`code`",
    "[link](https://e.x/p)",
    "\n\n```js\nlet a = 1;\n  let b = '😀';\n\n```\n\n",
    "\n\n> quoted **strong** line\n\n",
    "\n- item one\n- item two\n",
    "\n\n## Heading\n\n",
]


@pytest.mark.parametrize("seed", range(40))
def test_split_invariants_on_generated_input(seed: int) -> None:
    rng = random.Random(seed)
    md = "".join(rng.choice(_PIECES) for _ in range(rng.randrange(1, 400)))
    chunk = render_markdown(md)
    limit = rng.choice([7, 20, 64, 300, 4096])
    parts = split_chunk(chunk, limit)
    starts = locate(chunk.text, parts)
    squeeze = str.maketrans("", "", _WS)
    assert "".join(p.text for p in parts).translate(squeeze) == chunk.text.translate(squeeze)
    for part, start in zip(parts, starts, strict=True):
        assert_well_formed(part, limit)
        prefix = utf16_len(chunk.text[:start])
        for e in part.entities:
            # each part entity is a piece of an original entity with the same attributes
            absolute = prefix + e["offset"]
            assert any(
                {**o, "offset": 0, "length": 0} == {**e, "offset": 0, "length": 0}
                and o["offset"] <= absolute
                and absolute + e["length"] <= o["offset"] + o["length"]
                for o in chunk.entities
            ), e
