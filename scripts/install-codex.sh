#!/usr/bin/env bash
# Install the pinned @openai/codex npm package into .tools/codex (ignored by git)
# and print the bin directory to put on PATH. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="${CODEX_VERSION:-0.169.0}"
prefix="$root/.tools/codex"
bin="$prefix/node_modules/.bin"
if [ -x "$bin/codex" ] && "$bin/codex" --version 2>/dev/null | grep -q "$version"; then
    echo "$bin"
    exit 0
fi
mkdir -p "$prefix"
npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "@openai/codex@$version" >&2
"$bin/codex" --version >&2
echo "$bin"
