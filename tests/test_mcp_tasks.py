"""MCP tasks (SEP-2663) backed by the mesh, driven through the SDK client's extension framework:
a task handle from one node is read and cancelled at others; clients without the extension and
2025-11-25 connections see the tools as before."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from mcp.shared.exceptions import MCPError

from conftest import TOKEN, call, wait_until
from mcpp.harness import ProcessCluster
from mcpp.mcp.client import TasksClient, get_task, open_client, structured
from mcpp.mcp.tasks import EXTENSION, AckResult, CancelTaskRequest, CreateTaskResult, TaskIdParams


def tasks_client(url: str, **options: Any) -> Any:
    return open_client(url, TOKEN, extensions=[TasksClient()], **options)


async def submit_for_handle(url: str, tool: str, args: dict[str, Any]) -> CreateTaskResult:
    async with tasks_client(url) as c:
        assert EXTENSION in (c.server_capabilities.extensions or {}), "advertised under capabilities.extensions"
        handle = await c.session.call_tool(tool, args, allow_claimed=True)
    assert isinstance(handle, CreateTaskResult), handle
    return handle


async def poll(url: str, task_id: str, until: set[str], timeout_s: float) -> Any:
    async with tasks_client(url) as c:
        deadline = trio.current_time() + timeout_s
        while True:
            got = await get_task(c.session, task_id)
            if got.status in until or trio.current_time() > deadline:
                return got
            await trio.sleep((got.poll_interval_ms or 1000) / 1000)


def test_a_task_handle_from_node_a_runs_to_completion_through_tasks_get_on_node_b(cluster: ProcessCluster) -> None:
    a, b = cluster.nodes[0].mcp_url, cluster.nodes[1].mcp_url

    async def go() -> tuple[CreateTaskResult, Any, list[str]]:
        handle = await submit_for_handle(a, "task_submit", {"task_type": "sleep", "payload": {"seconds": 1}})
        seen = []
        async with tasks_client(b) as c:
            while True:
                got = await get_task(c.session, handle.task_id)
                seen.append(got.status)
                if got.status != "working":
                    return handle, got, seen
                await trio.sleep(0.2)

    handle, got, seen = trio.run(go)
    # the handle is the mesh task: its id is readable through the ordinary tools too
    assert handle.result_type == "task" and handle.status == "working"
    assert "ttl_ms" in handle.model_fields_set and handle.ttl_ms is None, "ttlMs: null is sent (no expiry)"
    assert handle.poll_interval_ms == 1000 and handle.created_at.endswith("Z")
    assert call(b, "task_status", {"task_id": handle.task_id})["status"] == "completed"
    assert seen[0] == "working" and got.status == "completed" and got.result_type == "complete", seen
    assert got.result is not None and got.result["isError"] is False
    assert got.result["structuredContent"]["status"] == "completed"
    assert got.result["structuredContent"]["result"] == {"slept_s": 1}
    assert got.last_updated_at is not None and got.last_updated_at >= got.created_at


def test_tasks_cancel_on_node_c_cancels_the_mesh_task(cluster: ProcessCluster) -> None:
    a, b, c3 = (n.mcp_url for n in cluster.nodes[:3])

    async def go() -> tuple[CreateTaskResult, Any]:
        handle = await submit_for_handle(a, "task_submit", {"task_type": "sleep", "payload": {"seconds": 30}})
        async with tasks_client(c3) as c:
            ack = await c.session.send_request(CancelTaskRequest(params=TaskIdParams(task_id=handle.task_id)),
                                               AckResult)
            assert ack.model_dump(by_alias=True, exclude_none=True)["resultType"] == "complete"
        return handle, await poll(b, handle.task_id, {"cancelled", "completed", "failed"}, 15)

    t0 = time.monotonic()
    handle, got = trio.run(go)
    assert got.status == "cancelled" and time.monotonic() - t0 < 15
    assert call(a, "task_status", {"task_id": handle.task_id})["status"] == "cancelled"


def test_a_workflow_handle_completes_with_the_workflow_result_and_client_call_tool_polls_it(
        cluster: ProcessCluster) -> None:
    a, b = cluster.nodes[0].mcp_url, cluster.nodes[3].mcp_url
    steps = [{"id": "x", "task_type": "echo", "payload": {"v": 7}},
             {"id": "y", "task_type": "echo", "payload": {"$ref": "steps.x.result.v"}, "depends_on": ["x"]}]

    async def go() -> tuple[CreateTaskResult, Any, Any]:
        handle = await submit_for_handle(a, "workflow_submit", {"name": "t", "steps": steps})
        got = await poll(b, handle.task_id, {"completed", "failed", "cancelled"}, 20)
        async with tasks_client(b) as c:  # the SDK resolves the handle by itself (polls tasks/get)
            final = await c.call_tool("task_submit", {"task_type": "echo", "payload": "through the claim"})
        return handle, got, final

    handle, got, final = trio.run(go)
    assert call(b, "workflow_status", {"workflow_id": handle.task_id})["status"] == "completed"
    assert got.status == "completed" and got.result is not None and got.result["isError"] is False
    assert got.result["structuredContent"]["results"] == {"x": {"v": 7}, "y": 7}
    assert structured(final)["status"] == "completed" and structured(final)["result"] == "through the claim"


def test_a_task_that_ran_and_failed_is_completed_with_is_error(cluster: ProcessCluster) -> None:
    a = cluster.nodes[0].mcp_url

    async def go() -> Any:
        handle = await submit_for_handle(a, "task_submit", {"task_type": "fail", "payload": {"message": "boom"},
                                                            "retry_policy": {"max_attempts": 1}})
        return await poll(cluster.nodes[2].mcp_url, handle.task_id, {"completed", "failed", "cancelled"}, 20)

    got = trio.run(go)
    assert got.status == "completed" and got.result is not None and got.result["isError"] is True
    assert "boom" in got.result["content"][0]["text"]


def test_unknown_ids_and_undeclared_clients_get_the_spec_errors(cluster: ProcessCluster) -> None:
    a = cluster.nodes[1].mcp_url
    # ids shaped like the mesh's own, owned by a live node (asked of it), and not ids at all
    unknown = ["nope@nowhere", f"deadbeefdeadbeef@{cluster.nodes[3].peer_id}", f"wf0@{cluster.nodes[1].peer_id}",
               "x" * 300]

    async def go() -> tuple[list[int], int, int]:
        codes = []
        async with tasks_client(a) as c:
            for task_id in unknown:
                with pytest.raises(MCPError) as e:
                    await get_task(c.session, task_id)
                codes.append(e.value.error.code)
        async with open_client(a, TOKEN) as plain:  # no extension declared
            with pytest.raises(MCPError) as undeclared:
                await get_task(plain.session, "nope@nowhere")
        async with tasks_client(a, mode="legacy") as legacy:  # 2025-11-25: no such method
            with pytest.raises(MCPError) as old:
                await get_task(legacy.session, "nope@nowhere")
        return codes, undeclared.value.error.code, old.value.error.code

    assert trio.run(go) == ([-32602] * len(unknown), -32021, -32601)


def test_cancelling_a_final_task_is_acknowledged_and_changes_nothing(cluster: ProcessCluster) -> None:
    a, b = cluster.nodes[0].mcp_url, cluster.nodes[4].mcp_url

    async def go() -> Any:
        handle = await submit_for_handle(a, "task_submit", {"task_type": "echo", "payload": "done"})
        got = await poll(b, handle.task_id, {"completed"}, 10)
        assert got.status == "completed"
        async with tasks_client(b) as c:
            await c.session.send_request(CancelTaskRequest(params=TaskIdParams(task_id=handle.task_id)), AckResult)
            return await get_task(c.session, handle.task_id)

    after = trio.run(go)
    assert after.status == "completed" and after.result is not None and not after.result["isError"]


@pytest.mark.parametrize("how", ["no extension", "2025-11-25"])
def test_clients_without_the_extension_get_the_submit_result_as_before(cluster: ProcessCluster, how: str) -> None:
    url = cluster.nodes[2].mcp_url

    async def go() -> dict[str, Any]:
        opener = open_client(url, TOKEN) if how == "no extension" else tasks_client(url, mode="legacy")
        async with opener as c:
            return structured(await c.session.call_tool("task_submit", {"task_type": "echo", "payload": 1}))

    out = trio.run(go)
    assert out["status"] in ("queued", "running", "completed") and "@" in out["task_id"]
    wait_until(lambda: call(url, "task_status", {"task_id": out["task_id"]})["status"] == "completed", 10)


def test_a_handle_survives_its_owner_killed_and_restarted(tmp_path: Path) -> None:
    """Injected: kill -9 of the node that owns a task just handed out as an MCP task (no worker
    serves its type yet, so it is still queued), then a restart on the same data dir. Checked:
    tasks/get on another node resolves it, and it runs to completion once a worker serves it."""
    with ProcessCluster(3, tmp_path, formation_timeout_s=60, token=TOKEN) as c:
        for n in c.nodes:
            call(n.mcp_url, "worker_register", {"capabilities": ["echo"]})
        a, b = c.nodes[0], c.nodes[1]
        handle = trio.run(submit_for_handle, a.mcp_url, "task_submit", {"task_type": "sleep",
                                                                        "payload": {"seconds": 0.5}})
        c.kill(a.name)
        c.restart(a.name)
        c.wait_formed(60)
        before = trio.run(poll, b.mcp_url, handle.task_id, {"working"}, 30)
        assert before.status == "working" and before.status_message.startswith("queued")
        call(b.mcp_url, "worker_register", {"capabilities": ["echo", "sleep"]})
        got = trio.run(poll, b.mcp_url, handle.task_id, {"completed", "failed", "cancelled"}, 30)
        assert got.status == "completed" and got.result is not None
        assert got.result["structuredContent"]["result"] == {"slept_s": 0.5}
