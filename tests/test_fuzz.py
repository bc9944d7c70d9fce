"""Property-based fuzzing of all 26 tools through a real MCP client (the SDK's, over streamable
HTTP with the bearer token) against a real 2-node mesh.

Arguments are generated from each tool's own input schema (as the node advertises it): every
parameter is left out, given a valid value of its type, or given an invalid one (wrong type,
huge or odd unicode strings, negative, NaN and infinite numbers, nested junk), and required
parameters are sometimes missing. Ids are sometimes real (a task, a workflow and the peers of
this mesh). Addresses are loopback or junk only: the fuzzer never makes a node dial out.

Checked for every call: an answer within CALL_TIMEOUT_S (no hung call), never an internal
error, and every error message names one of the tool's arguments. After each tool's run the
node still answers and its process is alive.

Examples per tool: MCPP_FUZZ_EXAMPLES (default 40 in CI: 26 x 40 = 1,040 calls; the full run
uses 400: 10,400 calls). With MCPP_FUZZ_OUT=DIR the counts go to DIR/fuzz.json.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TOKEN, call
from mcpp.harness import ProcessCluster
from mcpp.mcp.client import open_client
from mcpp.mcp.server import PEER_TOOLS, QUEUE_TOOLS, WORKFLOW_TOOLS

EXAMPLES = int(os.environ.get("MCPP_FUZZ_EXAMPLES", "40"))
CALL_TIMEOUT_S = 60.0
TOOLS = (*PEER_TOOLS, *QUEUE_TOOLS, *WORKFLOW_TOOLS)
STATS: Counter[str] = Counter()


class Session:
    """One MCP SDK session, driven by a trio loop in a thread so that hypothesis (sync) can call
    tools one at a time on the same session."""

    def __init__(self, url: str, token: str) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(url, token), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the MCP session did not open in 30 s")
        if self._error:
            raise self._error

    def _run(self, url: str, token: str) -> None:
        async def main() -> None:
            self.trio_token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with open_client(url, token) as c:
                self.client = c
                self.schemas = {t.name: t.input_schema for t in (await c.list_tools()).tools}
                self._ready.set()
                await self._stop.wait()

        try:
            trio.run(main)
        except BaseException as e:  # surfaced by the next call
            self._error = e
            self._ready.set()

    def call(self, tool: str, args: dict[str, Any]) -> Any:
        async def go() -> Any:
            with trio.fail_after(CALL_TIMEOUT_S):
                return await self.client.call_tool(tool, args)

        if self._error:
            raise self._error
        return trio.from_thread.run(go, trio_token=self.trio_token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self.trio_token)
        self._thread.join(10)


@pytest.fixture(scope="module")
def fuzz_mesh(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with ProcessCluster(2, tmp_path_factory.mktemp("fuzz"), token=TOKEN, node_args=["--lease-s", "1.5"]) as c:
        url = c.nodes[0].mcp_url
        task = call(url, "task_submit", {"task_type": "echo", "payload": {"x": 1}})["task_id"]
        wf = call(url, "workflow_submit", {"name": "fuzz", "template": "diamond", "params": {"text": "f"}})
        s = Session(url, TOKEN)
        known = {"task": [task, task.split("@")[0] + "@" + c.nodes[1].peer_id],
                 "workflow": [wf["workflow_id"]], "peer": [n.peer_id for n in c.nodes],
                 "addr": [a for n in c.nodes for a in n.multiaddrs] + ["/ip4/127.0.0.1/tcp/1/p2p/" + c.nodes[0].peer_id]}
        try:
            yield c, s, known
        finally:
            s.close()
            out = os.environ.get("MCPP_FUZZ_OUT")
            if out:
                Path(out).mkdir(parents=True, exist_ok=True)
                (Path(out) / "fuzz.json").write_text(json.dumps(
                    {"examples_per_tool": EXAMPLES, "calls": sum(v for k, v in STATS.items() if k.startswith("calls:")),
                     "tool_errors": STATS["tool_errors"], "ok": STATS["ok"], "per_tool": {
                         k.split(":", 1)[1]: v for k, v in STATS.items() if k.startswith("calls:")}}, indent=2))


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=30))
JSON = st.recursive(JSON_LEAF, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                    max_leaves=12)
ODD_TEXT = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=50),
    st.just("x" * 100_000),
    st.just("\u202e\u0000\ud7ff\U0010ffff" * 10),
    st.just(""),
)
INVALID = st.one_of(
    st.integers(), st.floats(), st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.booleans(),
    ODD_TEXT, st.lists(JSON, max_size=3), st.dictionaries(st.text(max_size=5), JSON, max_size=3), st.none(),
)


def _no_dial(text: str) -> bool:
    return not text.startswith("/")  # junk only; real addresses come from the known loopback ones


def valid(schema: dict[str, Any], name: str, known: dict[str, list[str]]) -> st.SearchStrategy[Any]:
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([valid(s, name, known) for s in schema["anyOf"]])
    t = schema.get("type")
    if t == "string":
        junk = st.text(max_size=40).filter(_no_dial)
        if name in ("task_id",) or name == "depends_on":
            return st.one_of(st.sampled_from(known["task"]), junk)
        if name == "workflow_id":
            return st.one_of(st.sampled_from(known["workflow"]), junk)
        if name in ("peer_id", "peer", "worker", "worker_id"):
            return st.one_of(st.sampled_from(known["peer"]), junk)
        if name in ("multiaddr", "bootstrap_peers"):
            return st.one_of(st.sampled_from(known["addr"]), junk)
        if name in ("task_type", "capabilities", "capability", "capability_filter"):
            return st.one_of(st.sampled_from(["echo", "sleep", "sha256", "fail", "nope"]), junk)
        if name == "template":
            return st.one_of(st.sampled_from(["diamond", "map-reduce", "params: {}\nsteps: []\n"]), junk)
        return junk
    if t == "integer":
        return st.integers(-3, 2000)
    if t == "number":
        if name.endswith("timeout_s"):
            return st.floats(-1, 1.5, allow_nan=False)
        return st.floats(-1e3, 1e4, allow_nan=False, allow_infinity=False)
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    if t == "array":
        return st.lists(valid(schema.get("items", {}), name, known), max_size=4)
    if t == "object":
        if name == "retry_policy":
            return st.fixed_dictionaries({}, optional={"max_attempts": st.integers(-1, 3),
                                                       "backoff_s": st.floats(-1, 0.5, allow_nan=False),
                                                       "backoff_factor": st.floats(0, 3, allow_nan=False)})
        return st.dictionaries(st.text(max_size=8), JSON, max_size=4)
    return JSON  # payload and other free-form values


@st.composite
def arguments(draw: Any, schema: dict[str, Any], known: dict[str, list[str]]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    required = set(schema.get("required", []))
    mutate = draw(st.booleans())  # half the calls are well-typed throughout, half carry junk
    for name, sub in schema.get("properties", {}).items():
        if not mutate:
            mode = "valid" if name in required else draw(st.sampled_from(["valid", "valid", "omit"]))
        else:
            mode = draw(st.sampled_from(["valid", "valid", "invalid", "omit"] if name not in required
                                        else ["valid", "valid", "valid", "invalid", "omit"]))
        if mode == "valid":
            args[name] = draw(valid(sub, name, known))
        elif mode == "invalid":
            args[name] = draw(INVALID)
    if draw(st.integers(0, 20)) == 0:
        args[draw(st.text(min_size=1, max_size=10))] = draw(JSON_LEAF)  # an unknown argument
    return args


def _jsonable(args: dict[str, Any]) -> bool:
    try:
        json.dumps(args, allow_nan=False)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("tool", TOOLS)
def test_fuzz_tool(fuzz_mesh: Any, tool: str) -> None:
    c, session, known = fuzz_mesh
    schema = session.schemas[tool]
    params = set(schema.get("properties", {}))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
              suppress_health_check=list(HealthCheck))
    @given(args=arguments(schema, known))
    def check(args: dict[str, Any]) -> None:
        t0 = time.monotonic()
        try:
            res = session.call(tool, args)
        except trio.TooSlowError:
            pytest.fail(f"{tool}({args!r:.300}) hung for {CALL_TIMEOUT_S} s")
        except ValueError:
            # NaN / infinity cannot be sent as JSON: the client refuses before the node sees it
            assert not _jsonable(args)
            return
        STATS[f"calls:{tool}"] += 1
        assert time.monotonic() - t0 < CALL_TIMEOUT_S
        if res.is_error:
            STATS["tool_errors"] += 1
            text = " ".join(getattr(x, "text", "") for x in res.content)
            assert "internal error" not in text.lower(), f"{tool}({args!r:.300}): {text[:500]}"
            assert any(p in text for p in params), \
                f"{tool}({args!r:.300}): the error names no argument: {text[:500]}"
        else:
            STATS["ok"] += 1

    check()
    session.call("queue_resume", {})  # undo a fuzzed pause for the next tool
    for n in c.nodes:
        assert c.is_running(n.name), f"{n.name} died while fuzzing {tool}"
        assert httpx.get(n.base_url + "/healthz", timeout=5).status_code == 200
    assert call(c.nodes[0].mcp_url, "peer_metrics", {})["peer_id"] == c.nodes[0].peer_id
