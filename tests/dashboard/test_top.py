"""``mesh-node top`` in a real terminal (tmux): it shows the three nodes, then exits on
``q`` with status 0 and leaves the terminal usable."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mesh.client.local import LocalMesh
from tests.dashboard.conftest import need
from tests.node.conftest import ROOT, wait_for

TMUX = shutil.which("tmux")


def test_top_shows_peers_and_quits_on_q(dash_mesh: LocalMesh, tmp_path: Path) -> None:
    need(TMUX is not None, "tmux (apt-get install tmux)")
    assert TMUX is not None
    socket = f"mesh-top-{os.getpid()}"
    status = tmp_path / "status"
    command = [sys.executable, "-m", "node", "top", "--node", dash_mesh.nodes["node-2"].url]
    command += ["--key", dash_mesh.key]
    shell = f"cd {shlex.quote(str(ROOT))} && {shlex.join(command)}; echo $? > {status}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color"}

    def tmux(*args: str) -> str:
        out = subprocess.run(
            [TMUX, "-L", socket, *args], capture_output=True, text=True, env=env, timeout=20
        )
        return out.stdout

    tmux("new-session", "-d", "-s", "top", "-x", "150", "-y", "40", shell)
    try:
        screen = wait_for(
            lambda: (
                (s := tmux("capture-pane", "-p", "-t", "top"))
                and all(f"node-{i}" in s for i in (1, 2, 3))
                and "alive" in s
                and s
            ),
            30,
            "top to show the three nodes",
            step=0.2,
        )
        assert "mesh seen from node-2" in screen
        assert "tasks/s" in screen
        time.sleep(0.5)
        tmux("send-keys", "-t", "top", "q")
        wait_for(status.exists, 20, "top to exit on q", step=0.1)
        assert status.read_text().strip() == "0"
    finally:
        tmux("kill-server")
