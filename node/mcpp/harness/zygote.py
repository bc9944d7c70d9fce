"""A fork server for the local harness: import a program once, then fork each node from it.

Importing libp2p + mcp costs ~1.1 s of CPU per process; 20 cold node processes on 2 cores
spend ~15 s just importing. Forked children share the imported modules copy-on-write and
reach their own `trio.run` in milliseconds. The parent never starts a thread or an event
loop, so fork is safe. Each child is a separate OS process running exactly `mcpp <argv>`.

It knows no mcpp module: the harness names the entry point and what to preload
(`python -m mcpp.harness.zygote --entry mcpp.cli:main --preload mcpp.cli mcpp.runner`), so the
harness, below the node program in the layers, never imports it.

Protocol (JSON lines): stdin  {"argv": [...], "log": "path"}
                       stdout {"pid": N} after each fork, {"exit": N, "code": C} when a child ends
EOF at stdin: SIGTERM every child, wait for them, exit. Children die with the server
(PR_SET_PDEATHSIG), and the server dies with its parent.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import selectors
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["main"]


def _pdeathsig() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _child(req: dict[str, Any], parent: int, entry: Callable[[list[str]], int]) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        os.setsid()
        _pdeathsig()
        if os.getppid() != parent:  # the server died before prctl took effect
            os._exit(1)
        signal.set_wakeup_fd(-1)
        for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.argv = ["mcpp", *req["argv"]]
        code = entry(list(req["argv"]))
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _load(entry: str) -> Callable[[list[str]], int]:
    module, _, name = entry.partition(":")
    fn: Callable[[list[str]], int] = getattr(importlib.import_module(module), name)
    return fn


def main(argv: list[str] | None = None) -> int:
    # --tag DIR only labels the process (ps / pgrep -f DIR finds a cluster's server)
    parser = argparse.ArgumentParser(prog="python -m mcpp.harness.zygote")
    parser.add_argument("--entry", required=True, help="MODULE:FUNCTION each child calls with its argv")
    parser.add_argument("--preload", nargs="*", default=[], help="modules imported once, shared by every child")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    _pdeathsig()
    for module in args.preload:  # the point: import once, share with every child
        importlib.import_module(module)
    entry = _load(args.entry)

    parent = os.getpid()
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    sel.register(r, selectors.EVENT_READ)
    buf = b""
    eof = False

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            _emit({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    _emit({"ready": parent})
    while not eof:
        for key, _ in sel.select():
            if key.fd == r:
                with contextlib.suppress(BlockingIOError):
                    os.read(r, 4096)
                reap()
                continue
            chunk = os.read(0, 65536)
            if not chunk:
                eof = True
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    os.close(r)
                    os.close(w)
                    _child(req, parent, entry)
                children.add(pid)
                _emit({"pid": pid})
    for pid in list(children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    signal.set_wakeup_fd(-1)
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        children.discard(pid)
        _emit({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
