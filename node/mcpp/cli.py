"""The `mcpp` command line: keygen, node, cluster up/status/down, demo, bench."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mcpp.errors import MCPPError

__all__ = ["main"]


def _node_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", choices=["bootstrap", "worker"])
    p.add_argument("--listen", metavar="MULTIADDR", help="libp2p listen address, e.g. /ip4/127.0.0.1/tcp/4001")
    p.add_argument("--announce", metavar="MULTIADDR", nargs="+", help="addresses to advertise instead")
    p.add_argument("--bootstrap", metavar="MULTIADDR", nargs="+", help="bootstrap peers (/ip4/../tcp/../p2p/<id>)")
    p.add_argument("--identity", metavar="FILE",
                   help="node key file (created if missing): a stable peer id [default: DATA_DIR/identity.key]")
    p.add_argument("--mcp-host", metavar="H")
    p.add_argument("--mcp-port", metavar="P", type=int)
    p.add_argument("--mcp-transport", choices=["http", "stdio"])
    p.add_argument("--mcp-response", choices=["json", "sse"],
                   help="sse (default): responses that can stream progress notifications; json: one JSON body, "
                        "no notifications")
    p.add_argument("--allowed-hosts", metavar="HOST", nargs="+", help="extra Host headers the MCP endpoint accepts")
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument("--capabilities", metavar="NAME", nargs="+")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--max-concurrent", metavar="N", type=int, help="tasks this node's worker runs at once (4)")
    p.add_argument("--lease-s", metavar="S", type=float, help="lease of a running task, renewed by heartbeats (5)")
    p.add_argument("--max-payload-bytes", metavar="B", type=int, help="limit of a task's payload and result (1 MiB)")
    p.add_argument("--max-queued-tasks", metavar="N", type=int, help="waiting tasks this node may own (100000)")
    p.add_argument("--quota", dest="quotas", metavar="TAG=Q/R", action="append",
                   help="per-tag limit of queued (Q) and running (R) tasks, e.g. batch=100/4 (repeatable)")
    p.add_argument("--handler", dest="handlers", metavar="NAME=module:function", action="append",
                   help="an extra task type (repeatable)")
    p.add_argument("--replicas", metavar="N", type=int, help="peers holding a copy of each accepted task (1; 0: none)")
    p.add_argument("--owner-timeout-s", metavar="S", type=float,
                   help="a replica adopts the tasks of an owner gone this long (10)")
    p.add_argument("--replication", choices=["async", "sync"],
                   help="sync (default): task_submit returns once the replicas hold the task and says how many "
                        "(replicas); async: it returns at once, the copy follows")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding the MCP bearer token (or set MCPP_TOKEN); without one, MCP binds to loopback only")
    p.add_argument("--protect-metrics", action="store_const", const=True,
                   help="/metrics and /status need the token too")
    p.add_argument("--swarm-key-file", metavar="FILE",
                   help="libp2p private-network key (swarm.key format; or set MCPP_SWARM_KEY): nodes without it cannot connect")
    p.add_argument("--allow-peers", metavar="PEER_ID", nargs="+", help="only these peers may connect")
    p.add_argument("--max-message-bytes", metavar="B", type=int, help="largest RPC frame accepted from a peer (4 MiB)")
    p.add_argument("--rpc-timeout-s", metavar="S", type=float, help="default timeout of an RPC call to a peer (10)")
    p.add_argument("--max-inflight-per-peer", metavar="N", type=int,
                   help="RPC requests one peer may have running here at once (64)")
    p.add_argument("--degree-low", metavar="N", type=int, help="below this many neighbours, dial members (6)")
    p.add_argument("--degree", metavar="N", type=int, help="neighbours kept open whatever the mesh's size (8)")
    p.add_argument("--degree-high", metavar="N", type=int, help="above this many, close idle links down to --degree (12)")
    p.add_argument("--max-connections", metavar="N", type=int,
                   help="hard cap of libp2p connections: neighbours, on-demand and DHT lookups (64)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (same names as the flags)")


_NODE_KEYS = (
    "role", "listen", "announce", "bootstrap", "identity", "mcp_host", "mcp_port", "mcp_transport", "mcp_response",
    "allowed_hosts", "data_dir", "capabilities", "log_level", "max_concurrent", "lease_s", "max_payload_bytes",
    "max_queued_tasks", "quotas", "handlers", "token_file", "protect_metrics", "swarm_key_file", "allow_peers",
    "max_inflight_per_peer", "max_message_bytes", "rpc_timeout_s", "replicas", "owner_timeout_s", "replication",
    "degree_low", "degree", "degree_high", "max_connections",
)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from mcpp.net import identity

    kp = identity.generate()
    identity.save(kp, args.out, overwrite=args.force)
    print(identity.peer_id_of(kp))
    return 0


def _cmd_peer_id(args: argparse.Namespace) -> int:
    from mcpp.net import identity

    print(identity.peer_id_of(identity.load(args.file)))
    return 0


def _write_secret(text: str, out: str | None, force: bool) -> None:
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    from pathlib import Path

    from mcpp.errors import ArgumentError

    path = Path(out)
    if path.exists() and not force:
        raise ArgumentError("--out", f"{out} exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    print(f"wrote {out} (mode 0600)", file=sys.stderr)


def _cmd_token(args: argparse.Namespace) -> int:
    from mcpp.config import new_token

    _write_secret(new_token(), args.out, args.force)
    return 0


def _cmd_swarm_key(args: argparse.Namespace) -> int:
    from mcpp.config import new_swarm_key

    _write_secret(new_swarm_key(), args.out, args.force)
    return 0


def _cmd_secrets_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mcpp.harness import secrets

    directory = Path(args.dir)
    compose_env = Path(args.compose_env) if args.compose_env else None
    if compose_env is None:  # from a checkout with the default folder: the Compose project's .env
        in_checkout = Path("compose/docker-compose.yml").exists() and directory == secrets.DEFAULT_DIR
        compose_env = Path("compose/.env") if in_checkout else directory / "compose.env"
    done = secrets.init_secrets(directory, force=args.force, rotate_token=args.rotate_token,
                                compose_env=compose_env)
    what = "a new MCP token" if args.rotate_token else "a new MCP token, swarm key and bootstrap identity"
    print(f"wrote {what} to {done.dir}/ (secret files mode 0600, owned by uid {done.owner_uid})")
    print(f"bootstrap peer id: {done.peer_id}")
    print(f"Compose reads {done.compose_env}" + ("" if done.compose_env == Path("compose/.env")
                                                  else f" (docker compose --env-file {done.compose_env} ...)"))
    if directory == secrets.DEFAULT_DIR:
        print("Kubernetes: kubectl apply -k k8s/ (k8s/ renders its Secrets from this folder)")
    else:
        print(f"Kubernetes reads {secrets.DEFAULT_DIR}/: include {done.dir}/ in your own kustomization instead")
    return 0


def _cmd_seed(args: argparse.Namespace) -> int:
    from mcpp.harness import seed

    seeds = []
    for spec in args.seed:
        try:
            key, host, port = spec.rsplit(":", 2)
            seeds.append(seed.seed_from_key(key, host, int(port)))
        except ValueError:
            from mcpp.errors import ArgumentError

            raise ArgumentError("--seed", f"{spec!r} is not KEY_FILE:HOST:PORT") from None
    sys.stdout.write(seed.render(seeds, args.format))
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    from mcpp.config import load_config
    from mcpp.log import setup_logging
    from mcpp.runner import run_node

    flags: dict[str, Any] = {k: getattr(args, k) for k in _NODE_KEYS}
    config = load_config(flags, os.environ, args.config)
    setup_logging(config.log_level)
    return run_node(config)


def _cmd_cluster(args: argparse.Namespace) -> int:
    from mcpp.harness import cli as harness_cli

    return harness_cli.run(args)


def _cmd_task(args: argparse.Namespace) -> int:
    from mcpp.mcp import task_cli

    return task_cli.run(args)


def _cmd_workflow(args: argparse.Namespace) -> int:
    from mcpp.mcp import workflow_cli

    return workflow_cli.run(args)


def _cmd_healthcheck(args: argparse.Namespace) -> int:
    import urllib.request

    url = args.url or f"http://127.0.0.1:{os.environ.get('MCPP_MCP_PORT') or 8765}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as r:
            return 0 if r.status == 200 else 1
    except OSError as e:
        print(f"mcpp: unhealthy: {url}: {e}", file=sys.stderr)
        return 1


def _cmd_image(args: argparse.Namespace) -> int:
    from mcpp.harness.image import build_image

    b = build_image(args.tag, rebuild_base=args.rebuild_base)
    print(f"built {b.tag}: {b.size_mb} MB in {b.total_s} s (base {'built' if b.base_built else 'cached'} "
          f"{b.base_s} s, wheels {b.wheels_s} s, docker build {b.docker_s} s)")
    return 0


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from mcpp.evidence import loadtest

    return loadtest.run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from mcpp.evidence import demo

    return demo.run(args)


def _cmd_chaos(args: argparse.Namespace) -> int:
    from mcpp.evidence import chaos

    return chaos.run(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from mcpp.evidence import bench

    return bench.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcpp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="write a new node key and print its peer id")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(fn=_cmd_keygen)

    p = sub.add_parser("peer-id", help="print the peer id of a key file")
    p.add_argument("file")
    p.set_defaults(fn=_cmd_peer_id)

    p = sub.add_parser("token", help="print (or write with --out) a new MCP bearer token")
    p.add_argument("--out", metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(fn=_cmd_token)

    p = sub.add_parser("swarm-key", help="print (or write with --out) a new private-network key (swarm.key format)")
    p.add_argument("--out", metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(fn=_cmd_swarm_key)

    p = sub.add_parser("secrets", help="make this deployment's own secrets (Compose, Kubernetes)")
    ssub = p.add_subparsers(dest="secrets_command", required=True)
    si = ssub.add_parser("init", help="generate an MCP token, a swarm key and a bootstrap identity into "
                                      "bootstrap/secrets/ (git-ignored, mode 0600); print the bootstrap peer id")
    si.add_argument("--dir", default="bootstrap/secrets", help="the folder to write (default: %(default)s)")
    si.add_argument("--force", action="store_true", help="replace every secret of an existing folder")
    si.add_argument("--rotate-token", action="store_true", help="replace the MCP token alone")
    si.add_argument("--compose-env", metavar="FILE",
                    help="the env file to set MCPP_SECRETS_DIR / MCPP_BOOTSTRAP_ID in (default: compose/.env "
                         "from a checkout with the default --dir, else DIR/compose.env)")
    si.set_defaults(fn=_cmd_secrets_init)

    p = sub.add_parser("seed", help="render the bootstrap multiaddr list for the harness, Compose or Kubernetes")
    p.add_argument("--seed", action="append", required=True, metavar="KEY_FILE:HOST:PORT",
                   help="a bootstrap's key file, and the host and libp2p port it is reached at (repeatable)")
    p.add_argument("--format", default="lines", choices=["lines", "env", "yaml", "json", "configmap"])
    p.set_defaults(fn=_cmd_seed)

    p = sub.add_parser("node", help="run one node (bootstrap or worker)")
    _node_flags(p)
    p.set_defaults(fn=_cmd_node)

    p = sub.add_parser("cluster", help="start / inspect / stop a local N-node mesh")
    csub = p.add_subparsers(dest="cluster_command", required=True)
    up = csub.add_parser("up", help="start a mesh and stay in the foreground until SIGINT/SIGTERM")
    up.add_argument("--nodes", type=int, default=5)
    up.add_argument("--dir", default=".cluster")
    up.add_argument("--base-port", type=int, default=None, help="first port (default: free ports)")
    up.add_argument("--backend", choices=["process", "docker"], default="process",
                    help="process: local processes (default); docker: containers of --image on a private network")
    up.add_argument("--image", default="mcpp-node:local", help="node image for --backend docker (mcpp image build)")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the mesh to form")
    st = csub.add_parser("status", help="show the mesh started in --dir")
    st.add_argument("--dir", default=".cluster")
    dn = csub.add_parser("down", help="stop the mesh started in --dir")
    dn.add_argument("--dir", default=".cluster")
    p.set_defaults(fn=_cmd_cluster)

    p = sub.add_parser("task", help="submit / inspect tasks through a node's MCP endpoint")
    from mcpp.mcp.task_cli import add_arguments

    add_arguments(p)
    p.set_defaults(fn=_cmd_task)

    p = sub.add_parser("workflow", help="run a YAML workflow template; workflow status / result / graph")
    from mcpp.mcp.workflow_cli import add_arguments as add_workflow_arguments

    add_workflow_arguments(p)
    p.set_defaults(fn=_cmd_workflow)

    p = sub.add_parser("healthcheck", help="exit 0 if this node answers /healthz (by hand; the image probes with bash, not Python)")
    p.add_argument("--url", help="default: http://127.0.0.1:$MCPP_MCP_PORT/healthz")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(fn=_cmd_healthcheck)

    p = sub.add_parser("image", help="build the node image here (mmdebstrap base, host wheelhouse, nothing pulled)")
    isub = p.add_subparsers(dest="image_command", required=True)
    b = isub.add_parser("build", help="build mcpp-node:local")
    b.add_argument("--tag", default="mcpp-node:local")
    b.add_argument("--rebuild-base", action="store_true", help="rebuild the Debian base too")
    p.set_defaults(fn=_cmd_image)

    p = sub.add_parser("loadtest", help="start a mesh and run Locust against its MCP endpoints; write summary.json")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--duration", default="30s", help="e.g. 30s, 2m (at most 10 minutes)")
    p.add_argument("--backend", choices=["process", "docker"], default="process")
    p.add_argument("--quick", action="store_true", help="15 s")
    p.add_argument("--mcp-response", choices=["sse", "json"], default="sse",
                   help="the nodes' MCP response mode (default: sse, the nodes' default)")
    p.add_argument("--out", default="loadtest-results")
    p.set_defaults(fn=_cmd_loadtest)

    p = sub.add_parser("demo", help="start a 5-node mesh, show discovery and some MCP tool calls, stop")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--dir", default=".mcpp-demo")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("chaos", help="run a mesh under load while killing, restarting, pausing (and partitioning) "
                                     "nodes; check nothing was lost or done twice; write verdict.json")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load and faults (then heal and check)")
    p.add_argument("--backend", choices=["process", "docker"], default="process",
                   help="docker adds network partitions (docker network disconnect)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the load and the nemesis")
    p.add_argument("--out", default="chaos-results")
    p.set_defaults(fn=_cmd_chaos)

    p = sub.add_parser("bench", help="measure start-up, RSS, formation and RPC latency; write JSON")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--only", choices=["containers", "mcp", "replication"],
                   help="one section alone: containers = image build, formation, RSS and idle CPU per container; "
                        "mcp = a tool call with SSE and JSON responses on both protocol revisions; "
                        "replication = what each replication setting costs (round trip, no-op throughput)")
    p.set_defaults(fn=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except MCPPError as e:
        print(f"mcpp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
