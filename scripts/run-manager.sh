#!/usr/bin/env bash
# Install (idempotent) and run the manager with ./codex_config.json or --config PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/install.sh" >&2
exec "$root/.venv/bin/python" -m codexnet.manager "$@"
