"""The error tree of mcpp. Every error mcpp raises on purpose derives from MCPPError.

MCPPError
├── ConfigError(field, value)          a setting is invalid; `field` is its dotted name
├── ArgumentError(argument, reason)    a caller (MCP tool, CLI) passed a bad argument
│   └── PayloadTooLarge                over max_payload_bytes (counted as a limit hit)
├── IdentityError(path)                an identity key file cannot be read or written
├── PeerError(peer_id)                 something about one remote peer
│   ├── PeerUnreachable                we could not dial it / it is not connected
│   └── PeerNotFound                   the DHT does not know it
├── RPCError                           the mcpp RPC protocol
│   ├── RPCTimeout(method, peer_id)    no answer in time
│   ├── StreamBroken(peer_id)          the peer or the network broke the stream (not us)
│   ├── FrameError                     a malformed / oversized frame
│   └── RemoteError(code, method)      the peer answered with an error
├── QueueError                         the task queue refused or failed an operation
│   ├── TaskNotFound(task_id)          no node of the mesh owns that task id (an ArgumentError too)
│   ├── QuotaExceeded(quota)           a submit over a configured limit; the message names it
│   └── OwnerError(owner, code)        the task's owner answered a forwarded call with an error
├── WorkflowError                      a workflow was refused or failed
│   └── CycleError(steps)              the steps' dependencies form a cycle (listed in order)
└── HarnessError
    └── NodeStartError(node, logs)     a node of a cluster did not become ready
"""

from __future__ import annotations

__all__ = [
    "MCPPError",
    "ConfigError",
    "ArgumentError",
    "IdentityError",
    "PeerError",
    "PeerUnreachable",
    "PeerNotFound",
    "RPCError",
    "RPCTimeout",
    "StreamBroken",
    "FrameError",
    "RemoteError",
    "HarnessError",
    "NodeStartError",
    "QueueError",
    "TaskNotFound",
    "QuotaExceeded",
    "PayloadTooLarge",
    "OwnerError",
    "WorkflowError",
    "CycleError",
]


class MCPPError(Exception):
    """Root of every error mcpp raises on purpose."""


class ConfigError(MCPPError):
    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"config {field}={value!r}: {reason}")


class ArgumentError(MCPPError):
    """A bad argument to a tool or command; the message starts with the argument's name."""

    def __init__(self, argument: str, reason: str) -> None:
        self.argument = argument
        self.reason = reason
        super().__init__(f"{argument}: {reason}")


class IdentityError(MCPPError):
    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"identity file {path}: {reason}")


class PeerError(MCPPError):
    def __init__(self, peer_id: str, reason: str) -> None:
        self.peer_id = peer_id
        self.reason = reason
        super().__init__(f"peer {peer_id}: {reason}")


class PeerUnreachable(PeerError):
    pass


class PeerNotFound(PeerError):
    pass


class RPCError(MCPPError):
    pass


class RPCTimeout(RPCError):
    def __init__(self, method: str, peer_id: str, timeout_s: float) -> None:
        self.method = method
        self.peer_id = peer_id
        self.timeout_s = timeout_s
        super().__init__(f"rpc {method} to {peer_id}: no answer within {timeout_s:g} s")


class StreamBroken(RPCError):
    def __init__(self, peer_id: str, reason: str) -> None:
        self.peer_id = peer_id
        super().__init__(f"rpc stream to {peer_id} broken: {reason}")


class FrameError(RPCError):
    pass


class RemoteError(RPCError):
    """The remote peer handled the request and answered with an error."""

    def __init__(self, code: str, method: str, message: str) -> None:
        self.code = code
        self.method = method
        self.remote_message = message
        super().__init__(f"remote error in {method} [{code}]: {message}")


class QueueError(MCPPError):
    pass


class TaskNotFound(QueueError, ArgumentError):
    def __init__(self, task_id: str, argument: str = "task_id") -> None:
        self.task_id = task_id
        ArgumentError.__init__(self, argument, f"no task {task_id!r} in the mesh")


class QuotaExceeded(QueueError):
    def __init__(self, quota: str, reason: str) -> None:
        self.quota = quota
        self.limit = quota  # counted in /metrics as mcpp_limit_hits_total{limit=...}
        super().__init__(f"quota {quota} exceeded: {reason}")


class PayloadTooLarge(ArgumentError):
    """A payload or result over max_payload_bytes; the message names the argument."""

    limit = "max_payload_bytes"


class OwnerError(QueueError):
    """A forwarded call failed at the task's owner; the message is the owner's own."""

    def __init__(self, owner: str, code: str, message: str) -> None:
        self.owner = owner
        self.code = code
        super().__init__(message)


class WorkflowError(MCPPError):
    pass


class CycleError(WorkflowError, ArgumentError):
    def __init__(self, steps: list[str]) -> None:
        self.steps = steps
        ArgumentError.__init__(self, "steps", f"the dependencies form a cycle: {' -> '.join(steps)}")


class HarnessError(MCPPError):
    pass


class NodeStartError(HarnessError):
    def __init__(self, node: str, reason: str, logs: str = "") -> None:
        self.node = node
        self.logs = logs
        msg = f"node {node} did not start: {reason}"
        if logs:
            msg += "\n--- last log lines ---\n" + logs
        super().__init__(msg)
