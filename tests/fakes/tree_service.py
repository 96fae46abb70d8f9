"""A stand-in service for the tests of tests/fakes/processes.py (no codex needed).

`python -m tests.fakes.tree_service --config FILE` reads `{"children": [...],
"exit_code": N}` and starts one `sh -c "sleep 60 & wait"` per entry (so each
child has a grandchild), in its own session when the entry says
`{"session": true}`, the way the proxy starts codex. Once the whole tree
exists it logs the pids and "ready", then waits; SIGTERM logs a line and exits with `exit_code`.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from types import FrameType


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as f:
        config = json.load(f)

    def on_term(signum: int, frame: FrameType | None) -> None:
        print("SIGTERM received, shutting down", file=sys.stderr, flush=True)
        sys.exit(int(config.get("exit_code", 0)))

    signal.signal(signal.SIGTERM, on_term)
    children = [
        subprocess.Popen(
            ["sh", "-c", "sleep 60 & echo $!; exec >&-; wait"],
            stdout=subprocess.PIPE,
            start_new_session=bool(spec.get("session")),
        )
        for spec in config.get("children", [])
    ]
    # Each sh prints its sleep's pid: once read, the whole tree exists.
    grandchildren = [int(c.stdout.readline()) for c in children if c.stdout is not None]
    print("children " + " ".join(str(c.pid) for c in children), file=sys.stderr, flush=True)
    print("grandchildren " + " ".join(map(str, grandchildren)), file=sys.stderr, flush=True)
    print("ready", file=sys.stderr, flush=True)
    time.sleep(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
