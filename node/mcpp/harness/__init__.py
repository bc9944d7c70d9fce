"""The harness: N-node clusters as local processes (fork server) or containers (Docker backend),
the node image, seed lists, and `mcpp cluster up/status/down`.

May import: the base modules, `mcpp.net` (identity keys) and `mcpp.mcp` client helpers; it starts
nodes as programs and never imports the node. The Docker backend (`mcpp.harness.docker`) is not
re-exported: importing it loads testcontainers.
"""

from mcpp.harness.process import (
    CLUSTER_FILE,
    ClusterBackend,
    NodeRecord,
    ProcessCluster,
    free_ports,
    local_cluster,
    node_status,
    poll_statuses,
    read_cluster_file,
)

__all__ = [
    "NodeRecord",
    "ClusterBackend",
    "ProcessCluster",
    "local_cluster",
    "read_cluster_file",
    "node_status",
    "free_ports",
    "CLUSTER_FILE",
    "poll_statuses",
]
