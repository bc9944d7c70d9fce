"""Workflow specs: step normalisation, validation, `$ref` data passing, YAML templates, and the
graph views (levels, critical path, json / dot / mermaid).

Pure functions and frozen records; nothing here touches the network or the store.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from mcpp.errors import ArgumentError, CycleError
from mcpp.queue.model import RetryPolicy, check_number, check_str_list, json_size

__all__ = [
    "Step",
    "FAILURE_POLICIES",
    "GRAPH_FORMATS",
    "parse_steps",
    "levels",
    "critical_path",
    "render_graph",
    "resolve_refs",
    "refs_in",
    "render_template",
]

FAILURE_POLICIES = ("fail_fast", "continue")
GRAPH_FORMATS = ("json", "dot", "mermaid")
MAX_STEPS = 1000
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")
_PLACEHOLDER = re.compile(r"\$\{params\.([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Step:
    id: str
    task_type: str
    payload: Any = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    priority: float | None = None
    timeout_s: float | None = None
    retry_policy: dict[str, Any] | None = None
    tags: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "task_type": self.task_type, "payload": self.payload,
                "depends_on": list(self.depends_on), "priority": self.priority, "timeout_s": self.timeout_s,
                "retry_policy": self.retry_policy, "tags": list(self.tags)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Step:
        return cls(d["id"], d["task_type"], d.get("payload", {}), tuple(d.get("depends_on", ())), d.get("priority"),
                   d.get("timeout_s"), d.get("retry_policy"), tuple(d.get("tags", ())))


def _step(i: int, raw: Any, known_type: Callable[[str], bool]) -> Step:
    where = f"steps[{i}]"
    if not isinstance(raw, dict):
        raise ArgumentError(where, "must be an object {id, task_type, payload, depends_on}")
    sid = raw.get("id", raw.get("step_id"))
    if not isinstance(sid, str) or not _ID.match(sid):
        raise ArgumentError(f"{where}.id", "must be 1-64 letters, digits, _ . : - (also spelled step_id)")
    ttype = raw.get("task_type", raw.get("action"))
    if not isinstance(ttype, str) or not ttype:
        raise ArgumentError(f"{where}.task_type", "must name a task type (also spelled action)")
    if not known_type(ttype):
        raise ArgumentError(f"{where}.task_type", f"unknown task type {ttype!r}: no worker of the mesh serves it")
    payload = raw.get("payload", raw.get("params", raw.get("inputs", {})))
    json_size(f"{where}.payload", payload)
    deps = check_str_list(f"{where}.depends_on", raw.get("depends_on") or [], max_items=MAX_STEPS)
    known = {"id", "step_id", "task_type", "action", "payload", "params", "inputs", "depends_on", "priority",
             "timeout_s", "retry_policy", "tags", "name", "description"}
    extra = sorted(set(raw) - known)
    if extra:
        raise ArgumentError(f"{where}.{extra[0]}", "unknown field")
    prio = raw.get("priority")
    if prio is not None:
        check_number(f"{where}.priority", prio, -1e9, 1e9)
    tmo = raw.get("timeout_s")
    if tmo is not None:
        check_number(f"{where}.timeout_s", tmo, 0.001, 86400 * 7)
    rp = raw.get("retry_policy")
    if rp is not None:
        RetryPolicy.parse(rp, f"{where}.retry_policy")
    tags = check_str_list(f"{where}.tags", raw.get("tags") or [], max_items=20)
    return Step(sid, ttype, payload, tuple(dict.fromkeys(deps)), None if prio is None else float(prio),
                None if tmo is None else float(tmo), rp, tags)


def refs_in(value: Any) -> list[str]:
    """Every `{"$ref": "..."}` string inside a payload."""
    out: list[str] = []
    if isinstance(value, dict):
        if set(value) == {"$ref"}:
            out.append(str(value["$ref"]))
        else:
            for v in value.values():
                out += refs_in(v)
    elif isinstance(value, list):
        for v in value:
            out += refs_in(v)
    return out


def _ref_step(ref: str) -> str | None:
    parts = ref.split(".")
    if len(parts) >= 3 and parts[0] == "steps" and parts[2] == "result":
        return parts[1]
    return None


def parse_steps(raw: Any, known_type: Callable[[str], bool]) -> list[Step]:
    """Normalise and validate a step list. Raises ArgumentError / CycleError naming the culprit."""
    if not isinstance(raw, list) or not raw:
        raise ArgumentError("steps", "must be a non-empty list of steps")
    if len(raw) > MAX_STEPS:
        raise ArgumentError("steps", f"at most {MAX_STEPS} steps, got {len(raw)}")
    steps = [_step(i, s, known_type) for i, s in enumerate(raw)]
    seen: set[str] = set()
    for i, s in enumerate(steps):
        if s.id in seen:
            raise ArgumentError(f"steps[{i}].id", f"duplicate step id {s.id!r}")
        seen.add(s.id)
    for i, s in enumerate(steps):
        for d in s.depends_on:
            if d not in seen:
                raise ArgumentError(f"steps[{i}].depends_on", f"step {s.id!r} depends on unknown step {d!r}")
            if d == s.id:
                raise CycleError([s.id, s.id])
        for ref in refs_in(s.payload):
            target = _ref_step(ref)
            if target is None:
                raise ArgumentError(f"steps[{i}].payload", f"$ref {ref!r} must look like steps.<id>.result[.path]")
            if target not in s.depends_on:
                raise ArgumentError(f"steps[{i}].payload", f"$ref {ref!r} points at step {target!r}, "
                                    f"which is not a declared dependency of {s.id!r}")
    cycle = _find_cycle(steps)
    if cycle:
        raise CycleError(cycle)
    return steps


def _find_cycle(steps: list[Step]) -> list[str] | None:
    deps = {s.id: s.depends_on for s in steps}
    color: dict[str, int] = {}
    stack: list[str] = []
    for start in deps:
        if color.get(start):
            continue
        # iterative DFS: (node, iterator over its deps)
        work = [(start, iter(deps[start]))]
        color[start] = 1
        stack.append(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                stack.pop()
                color[node] = 2
                continue
            if color.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if not color.get(nxt):
                color[nxt] = 1
                stack.append(nxt)
                work.append((nxt, iter(deps[nxt])))
    return None


def levels(steps: list[Step]) -> list[list[str]]:
    """Topological levels: level k holds the steps whose longest dependency chain has k steps."""
    level: dict[str, int] = {}
    by_id = {s.id: s for s in steps}

    def lv(sid: str) -> int:
        if sid not in level:
            # the graph is acyclic (checked) and at most MAX_STEPS deep
            level[sid] = 1 + max((lv(d) for d in by_id[sid].depends_on), default=-1)
        return level[sid]

    for s in steps:
        lv(s.id)
    out: list[list[str]] = [[] for _ in range(max(level.values()) + 1)]
    for s in steps:
        out[level[s.id]].append(s.id)
    return out


def critical_path(steps: list[Step], weight: Callable[[str], float]) -> tuple[list[str], float]:
    """The heaviest dependency chain and its total weight."""
    best: dict[str, tuple[float, str | None]] = {}
    for lvl in levels(steps):
        for sid in lvl:
            step = next(s for s in steps if s.id == sid)
            prev = max(((best[d][0], d) for d in step.depends_on), default=(0.0, None))
            best[sid] = (prev[0] + weight(sid), prev[1])
    end = max(best, key=lambda k: best[k][0])
    path = [end]
    while (p := best[path[-1]][1]) is not None:
        path.append(p)
    return path[::-1], best[end][0]


def render_graph(steps: list[Step], fmt: str) -> Any:
    edges = [(d, s.id) for s in steps for d in s.depends_on]
    if fmt == "json":
        return {"nodes": [{"id": s.id, "task_type": s.task_type} for s in steps],
                "edges": [{"from": a, "to": b} for a, b in edges]}
    if fmt == "dot":
        lines = ["digraph workflow {"]
        lines += [f'  "{s.id}" [label="{s.id}\\n{s.task_type}"];' for s in steps]
        lines += [f'  "{a}" -> "{b}";' for a, b in edges]
        return "\n".join([*lines, "}"])
    lines = ["graph TD"]
    lines += [f'  {_mid(s.id)}["{s.id}: {s.task_type}"]' for s in steps]
    lines += [f"  {_mid(a)} --> {_mid(b)}" for a, b in edges]
    return "\n".join(lines)


def _mid(sid: str) -> str:
    """A mermaid-safe node id."""
    return "s_" + re.sub(r"[^A-Za-z0-9_]", "_", sid)


class RefError(Exception):
    """A `$ref` path does not exist in the referenced result (the step fails with this message)."""


def resolve_refs(value: Any, results: dict[str, Any]) -> Any:
    """Replace each `{"$ref": "steps.<id>.result.<path>"}` with that part of the step's result."""
    if isinstance(value, dict):
        if set(value) == {"$ref"}:
            ref = str(value["$ref"])
            parts = ref.split(".")
            cur = results[parts[1]]
            for p in parts[3:]:
                if isinstance(cur, dict) and p in cur:
                    cur = cur[p]
                elif isinstance(cur, list) and p.lstrip("-").isdigit() and -len(cur) <= int(p) < len(cur):
                    cur = cur[int(p)]
                else:
                    raise RefError(f"$ref {ref!r}: no {p!r} in the result of step {parts[1]!r}")
            return cur
        return {k: resolve_refs(v, results) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_refs(v, results) for v in value]
    return value


# ---- templates ------------------------------------------------------------------------
def render_template(text: str, params: dict[str, Any]) -> dict[str, Any]:
    """A YAML template -> {name, steps, failure_policy?, ...} with `${params.x}` replaced.

    `params:` in the template maps each parameter to its default (null = required). A string
    that is exactly one placeholder takes the parameter's value with its type; inside a longer
    string the value is formatted in.
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ArgumentError("template", f"not valid YAML: {e}") from None
    if not isinstance(doc, dict) or "steps" not in doc:
        raise ArgumentError("template", "must be a YAML mapping with name, params and steps")
    declared = doc.get("params") or {}
    if not isinstance(declared, dict):
        raise ArgumentError("template", "params must be a mapping of name -> default (null = required)")
    if not isinstance(params, dict):
        raise ArgumentError("params", "must be an object")
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ArgumentError("params", f"unknown template parameter(s): {', '.join(unknown)} "
                            f"(declared: {', '.join(map(str, declared)) or 'none'})")
    values = {str(k): v for k, v in declared.items()}
    values.update(params)
    missing = sorted(k for k, v in values.items() if v is None)
    if missing:
        raise ArgumentError("params", f"missing required template parameter(s): {', '.join(missing)}")
    used: set[str] = set()

    def sub(v: Any) -> Any:
        if isinstance(v, str):
            names = _PLACEHOLDER.findall(v)
            used.update(names)
            undeclared = sorted(set(names) - set(values))
            if undeclared:
                raise ArgumentError("template", f"uses undeclared parameter(s): {', '.join(undeclared)}")
            m = _PLACEHOLDER.fullmatch(v)
            if m:
                return values[m.group(1)]
            return _PLACEHOLDER.sub(lambda mm: str(values[mm.group(1)]), v)
        if isinstance(v, dict):
            return {sub(k) if isinstance(k, str) else k: sub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v

    body = {k: v for k, v in doc.items() if k != "params"}
    return dict(sub(body))
