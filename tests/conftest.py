"""Test-wide set-up: find the codex installed by scripts/install-codex.sh."""

from __future__ import annotations

import os
from pathlib import Path

_CODEX_BIN = Path(__file__).resolve().parent.parent / ".tools" / "codex" / "node_modules" / ".bin"

# The README's test command is plain `.venv/bin/python -m pytest`; the pinned
# codex lives in an ignored folder, so put it on PATH for the end-to-end tests.
if (_CODEX_BIN / "codex").exists():
    os.environ["PATH"] = f"{_CODEX_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
