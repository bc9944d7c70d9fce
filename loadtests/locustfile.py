"""Locust load test of the MCP surface of an mcpp mesh.

Each simulated user opens an MCP session (streamable HTTP, `initialize` then
`notifications/initialized`) on one node of the cluster (users are spread over all nodes) and
calls tools with `tools/call`; every call is reported to Locust as a request named after the
tool, failed when the HTTP status is not 200 or the result has `isError: true`. Responses are
read either way the node sends them: a JSON body, or an SSE stream (the default).

Task mix (weights): task_submit + task_result of an echo task (4), peer_list (2), queue_stats (2),
workflow_submit of a 4-step diamond (1).

Run through `mcpp loadtest` (which starts the cluster), or by hand against a running one:
  MCPP_CLUSTER_FILE=.cluster/cluster.json locust -f loadtests/locustfile.py --headless -u 16 -r 16 -t 30s
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

from locust import FastHttpUser, between, events, task

PROTOCOL = "2025-06-18"
DIAMOND = [
    {"id": "a", "task_type": "echo", "payload": {"v": 1}},
    {"id": "b", "task_type": "echo", "depends_on": ["a"], "payload": {"$ref": "steps.a.result.v"}},
    {"id": "c", "task_type": "echo", "depends_on": ["a"], "payload": {"$ref": "steps.a.result.v"}},
    {"id": "d", "task_type": "echo", "depends_on": ["b", "c"]},
]


def _cluster() -> tuple[list[str], str | None]:
    """The nodes' MCP URLs and the bearer token, from cluster.json (MCPP_TOKEN overrides the token)."""
    path = os.environ.get("MCPP_CLUSTER_FILE")
    data: dict[str, Any] = {}
    if path:
        with open(path) as f:
            data = json.load(f)
    return [n["mcp_url"] for n in data.get("nodes", [])], os.environ.get("MCPP_TOKEN") or data.get("token")


def _response(r: Any) -> dict[str, Any]:
    """The JSON-RPC response of a POST: the body (JSON responses), or the `data:` event that
    carries it (SSE responses, the nodes' default, on this handshake-era revision)."""
    if not r.headers.get("content-type", "").startswith("text/event-stream"):
        return dict(r.json())
    for line in r.text.splitlines():
        if line.startswith("data:"):
            msg = json.loads(line[5:])
            if "result" in msg or "error" in msg:
                return dict(msg)
    raise ValueError("no response in the event stream")


NODES, TOKEN = _cluster()
_next = itertools.count()


class McpUser(FastHttpUser):
    wait_time = between(0, 0)

    def on_start(self) -> None:
        url = NODES[next(_next) % len(NODES)] if NODES else self.host + "/mcp"
        self.base, _, self.path = url.partition("/mcp")
        self.path = "/mcp" + self.path
        self.client.base_url = self.base
        self.session_id = ""
        self.rid = 0
        r = self._post({"jsonrpc": "2.0", "id": self._id(), "method": "initialize", "params": {
            "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "locust", "version": "1"}}},
            "initialize")
        self.session_id = r.headers.get("mcp-session-id", "") if r is not None else ""
        self._post({"jsonrpc": "2.0", "method": "notifications/initialized"}, "initialized")

    def _id(self) -> int:
        self.rid += 1
        return self.rid

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream",
                   "mcp-protocol-version": PROTOCOL}
        if self.session_id:
            headers["mcp-session-id"] = self.session_id
        if TOKEN:
            headers["authorization"] = f"Bearer {TOKEN}"
        return headers

    def _post(self, body: dict[str, Any], name: str) -> Any:
        with self.client.post(self.path, json=body, headers=self._headers(), name=name, catch_response=True) as r:
            if r.status_code not in (200, 202):
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return None
            r.success()
            return r

    def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any] | None:
        """One tools/call, reported as a request named `tool`."""
        body = {"jsonrpc": "2.0", "id": self._id(), "method": "tools/call",
                "params": {"name": tool, "arguments": arguments}}
        with self.client.post(self.path, json=body, headers=self._headers(), name=tool, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return None
            try:
                doc = _response(r)
            except ValueError:
                r.failure(f"no JSON-RPC response: {r.text[:200]}")
                return None
            result = doc.get("result") or {}
            if "error" in doc or result.get("isError"):
                r.failure(json.dumps(doc.get("error") or result.get("content"))[:300])
                return None
            r.success()
            return dict(result.get("structuredContent") or {})

    @task(4)
    def submit_and_read(self) -> None:
        s = self.call("task_submit", {"task_type": "echo", "payload": {"t": time.time()}})
        if s is not None:
            self.call("task_result", {"task_id": s["task_id"], "wait": True, "timeout_s": 10})

    @task(2)
    def peer_list(self) -> None:
        self.call("peer_list", {})

    @task(2)
    def queue_stats(self) -> None:
        self.call("queue_stats", {"scope": "local"})

    @task(1)
    def workflow(self) -> None:
        self.call("workflow_submit", {"name": "locust-diamond", "steps": DIAMOND})


@events.init_command_line_parser.add_listener
def _args(parser: Any) -> None:
    parser.add_argument("--mcpp-note", default="", help="free text recorded by mcpp loadtest")
