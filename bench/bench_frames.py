"""What validating frames at decode costs, per frame; prints a table.

    .venv/bin/python bench/bench_frames.py [--repeat 5]

For each kind of frame: decoding as it was before validation (`json.loads`
and a lenient cattrs converter, the same tagged union) and as it is now
(`decode_proxy_frame` / `decode_manager_frame`: the depth check, exact types,
finite numbers, the field checks), and encoding with and without the scrub of
NUL and lone surrogates. The best of `--repeat` runs, in microseconds per
frame. Hostile frames show how fast they are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.strategies import configure_tagged_union

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from codexnet.protocol import (  # noqa: E402
    Frame,
    Hello,
    ProtocolError,
    Task,
    TaskEvent,
    TaskResult,
    decode_manager_frame,
    decode_proxy_frame,
    encode,
)

# The converter as it was: lenient primitives, no field checks.
_old = cattrs.Converter(forbid_extra_keys=True)
configure_tagged_union(
    Frame, _old, tag_name="type", tag_generator=lambda cls: attrs.fields(cls).type.default
)


def old_decode(raw: str) -> Any:
    return _old.structure(json.loads(raw), Frame)


def old_encode(frame: Any) -> str:
    return json.dumps(_old.unstructure(frame, Frame), separators=(",", ":"))


CODE = "def f(x):\n    return [g(y) for y in x if y[0] in {1: [2]}]\n"  # brackets, as in answers
FRAMES: list[tuple[str, Any, Callable[[str], Any]]] = [
    ("task_event delta, 40 chars", TaskEvent("t1u2", 17, "delta", "x" * 40), decode_proxy_frame),
    (
        "task_event snapshot, 3.5 kB code",
        TaskEvent("t1u2", 18, "snapshot", CODE * 60),
        decode_proxy_frame,
    ),
    (
        "task_result, 100 kB code",
        TaskResult("t1u2", "completed", CODE * 1700, "0199a-thread", None, {"total": 12345}),
        decode_proxy_frame,
    ),
    (
        "hello, 1 000 running ids",
        Hello(
            "proxy1",
            "t" * 32,
            2,
            2,
            ["linux"],
            "codexnet 0.1.0; codex 0.1",
            [f"t123u{n}" for n in range(1000)],
        ),
        decode_proxy_frame,
    ),
    (
        "task, 200-char prompt",
        Task("t1u2", 42, "p" * 200, "0199a-thread", 1800.0),
        decode_manager_frame,
    ),
]
HOSTILE: list[tuple[str, str]] = [
    ("100 000 deep (refused)", "[" * 100_000 + "]" * 100_000),
    (
        "4 MB, brackets in a string (accepted)",
        json.dumps(
            {
                "type": "task_event",
                "task_id": "t",
                "seq": 1,
                "kind": "delta",
                "text": "[" * 4_000_000,
            }
        ),
    ),
    (
        "4 MB of [{}] (refused: too long a label)",
        '{"type":"hello","proxy_id":"p","token":"t","protocol":2,"capacity":1,"labels":["'
        + "[{}]" * 1_000_000
        + '"]}',
    ),
]


def best(fn: Callable[[], object], repeat: int) -> float:
    """Microseconds per call, the best of `repeat` runs of about 0.2 s each."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat, number)) / number * 1e6


def refused(decode: Callable[[str], Any], raw: str) -> Callable[[], None]:
    def run() -> None:
        try:
            decode(raw)
        except ProtocolError:
            pass

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(
        f"{'frame':40} {'bytes':>9} {'decode was':>11} {'now':>9} {'+':>8}"
        f" {'encode was':>11} {'now':>9}"
    )
    for name, frame, decode in FRAMES:
        raw = encode(frame)
        assert decode(raw) == frame
        was = best(lambda raw=raw: old_decode(raw), args.repeat)
        now = best(lambda raw=raw, decode=decode: decode(raw), args.repeat)
        enc_was = best(lambda frame=frame: old_encode(frame), args.repeat)
        enc_now = best(lambda frame=frame: encode(frame), args.repeat)
        print(
            f"{name:40} {len(raw):9} {was:9.1f}us {now:7.1f}us {now - was:6.1f}us"
            f" {enc_was:9.1f}us {enc_now:7.1f}us"
        )
    print()
    print(f"{'hostile frame':40} {'bytes':>9} {'decode now':>11}")
    for name, raw in HOSTILE:
        now = best(refused(decode_proxy_frame, raw), args.repeat)
        print(f"{name:40} {len(raw):9} {now / 1000:9.1f}ms")


if __name__ == "__main__":
    main()
