"""The services raise their own soft open-files limit to the hard one at start.

Real processes started as systemd starts them (LimitNOFILE=256:<hard>); the
limit in force is read back from /proc/PID/limits.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from codexnet.rlimit import NR_OPEN
from tests.fakes.processes import (
    ManagerProcess,
    ProxyProcess,
    manager_config,
    proxy_config,
)


def soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
# An unlimited hard limit is raised to what Linux allows a soft one (nr_open).
HARD = int(NR_OPEN.read_text()) if _hard == resource.RLIM_INFINITY else _hard
# Started as systemd starts it with LimitNOFILE=256:<hard> (prlimit execs the command).
SYSTEMD_LIMIT = [
    "prlimit",
    f"--nofile=256:{'unlimited' if _hard == resource.RLIM_INFINITY else _hard}",
    "--",
]


async def test_the_manager_raises_its_open_files_limit_and_says_so(tmp_path: Path) -> None:
    # Telegram unreachable: the manager keeps retrying its start-up, the limit is raised first.
    config = manager_config(tmp_path / "state", "http://127.0.0.1:9")
    manager = ManagerProcess(config, tmp_path / "m", log_level="DEBUG", prefix=SYSTEMD_LIMIT)
    async with manager:
        await manager.wait_for_log(f"open files limit raised from 256 to {HARD}")
        assert soft_nofile(manager.pid) == HARD
    assert not any("Traceback" in line for line in manager.lines)


async def test_the_proxy_raises_its_open_files_limit_and_says_so(tmp_path: Path) -> None:
    # No manager listens and codex_bin is a stand-in: the limit is raised before either matters.
    config = proxy_config(9, tmp_path / "work", codex_bin=sys.executable)
    proxy = ProxyProcess(config, tmp_path / "p", log_level="DEBUG", prefix=SYSTEMD_LIMIT)
    async with proxy:
        await proxy.wait_for_log(f"open files limit raised from 256 to {HARD}")
        assert soft_nofile(proxy.pid) == HARD
