"""Data-parallel helpers: which process this is, and collectives that are the identity in a single one.

The process group comes from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), so the same
code runs as one plain process or as one of N ranks on one or several nodes.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

T = TypeVar("T")
LEAVE_GRACE_S = 10.0  # after one rank fails, how long relaunch lets the others leave on their own
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # a shell's status for a process stopped by Ctrl-C or `kill`


def launched() -> bool:
    """True inside a process started by torchrun (or anything else that sets its environment)."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def relaunch(nproc: int, module: str, args: Sequence[str] = ()) -> NoReturn:
    """Run `python -m module args...` as `nproc` ranks on this machine, then exit with the first failure's status.

    What torchrun --standalone does, with every endpoint on 127.0.0.1 (torchrun's store listens on all
    interfaces): this process holds the rendezvous store on a socket bound to loopback and the ranks
    join it as torchrun's agent store; gloo and NCCL bootstrap over the loopback interface. The command
    line stays `python -m module args...` (DVC, Prefect). A SIGTERM or SIGINT here goes to every rank; a rank
    whose parent dies is killed by the kernel (PR_SET_PDEATHSIG). When one rank fails, the others get
    LEAVE_GRACE_S to leave on their own (gloo tells them their peer is gone; they end the MLflow run and
    say where they stopped), then a SIGTERM, and a SIGKILL LEAVE_GRACE_S after that (a rank stuck in a
    collective never gets to its SIGTERM handler): killing them at once could cut rank 0 off in the
    middle of ending its run. Multi-node runs use torchrun directly.

    Raises: SystemExit always: 0 when every rank succeeded, else the first failure's status (128 + N
    for a rank killed by signal N).
    """
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, nproc, is_master=True, wait_for_workers=False,  # noqa: F841 - serves the ranks
                          master_listen_fd=listener.fileno())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True",
           "TORCHELASTIC_RESTART_COUNT": "0", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: ranks share the cores
    ranks = [subprocess.Popen([sys.executable, "-m", module, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              preexec_fn=_die_with_parent) for r in range(nproc)]

    def stop(signum: int, _frame) -> None:
        for p in ranks:
            p.send_signal(signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code, deadline, kills = 0, math.inf, [signal.SIGTERM, signal.SIGKILL]
    while [p.poll() for p in ranks].count(None):  # poll every rank, so each returncode is current
        if not code and (code := next((p.returncode for p in ranks if p.returncode), 0)):
            deadline = time.monotonic() + LEAVE_GRACE_S
        elif time.monotonic() > deadline:  # a rank still waiting for its failed peer would wait forever
            stop(kills.pop(0), None)
            deadline = time.monotonic() + LEAVE_GRACE_S if kills else math.inf
        time.sleep(0.2)
    code = code or next((p.returncode for p in ranks if p.returncode), 0)
    sys.exit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell reports it


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)


def init(device: torch.device) -> None:
    """Join the process group torchrun described: NCCL between GPUs, gloo between CPU processes.
    A no-op outside torchrun or when already joined; torch.distributed's errors (e.g. ValueError for
    an incomplete environment) pass through."""
    global _store
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)


_store: dist.Store | None = None  # the launcher's store (relaunch's or torchrun's): where a leaving rank says so


def reported_once(main: Callable[..., T]) -> Callable[..., T]:
    """Decorate a rank's entry point so that a failure is reported once, by the rank it happened on.

    A rank that leaves on an exception, a failing SystemExit or a KeyboardInterrupt (its `status`
    attribute, else 130) first records its exit status in the launcher's store. A rank whose collective
    then fails because that peer left (gloo: "Connection closed by peer") exits with the same status
    and one line naming the peer (none after a stop by Ctrl-C or SIGTERM, a status in STOPPED), instead
    of a traceback that says nothing the peer's own message does not.
    A rank that leaves after a peer has left ends with os._exit (its process group is broken, and
    gloo's threads would abort the interpreter's exit). Outside a process group, the decorator
    changes nothing."""
    @functools.wraps(main)
    def run(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except BaseException as e:
            if _store is None or not dist.is_initialized() or (isinstance(e, SystemExit) and e.code in (0, None)):
                raise
            me, gone = rank(), _peers_left()
            if gone and not isinstance(e, (SystemExit, KeyboardInterrupt)):
                peer, code = next(iter(gone.items()))
                if code not in STOPPED:
                    print(f"rank {me}: stopped: rank {peer} left (its message says why)", file=sys.stderr)
            else:
                code = (getattr(e, "status", 130) if isinstance(e, KeyboardInterrupt)
                        else e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)
                _store.set(_left(me), str(code))
                if not gone:
                    raise
                if isinstance(e, SystemExit) and isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            # A peer has left, so this process group is broken: at interpreter exit its gloo threads would
            # abort the process ("terminate called without an active exception"). Everything this rank
            # had to close (the MLflow run, its files) closed on the way out; leave without destructors.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return run


def peer_stopped() -> int | None:
    """The signal (SIGINT for Ctrl-C, or SIGTERM) on which another rank has left, from the status it
    recorded (`reported_once`; one in STOPPED): a collective of this rank that fails then failed for
    that reason. None when no rank has, and outside a process group."""
    if _store is None or not dist.is_initialized():
        return None
    return next((code - 128 for code in _peers_left().values() if code in STOPPED), None)


def _peers_left() -> dict[int, int]:
    """The other ranks that have left, each with the exit status it recorded in the launcher's store."""
    me = rank()
    return {r: int(_store.get(_left(r))) for r in range(world()) if r != me and _store.check([_left(r)])}


def _left(rank: int) -> str:
    """The store key where `rank` records its exit status; torchrun keeps its store across restarts."""
    return f"left/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def finish() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    """Number of ranks; 1 without a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in [0, world()); 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 alone logs, prints and writes files."""
    return rank() == 0


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` [n, ...] concatenated along dim 0 in rank order: [world() * n, ...], x's dtype.
    Every rank must pass the same shape. The gradient of each part flows back to the rank that
    produced it, summed over the ranks whose losses used it."""
    if world() == 1:
        return x
    # waited here, not at first use: a result no loss term reads would stay pending (and be reported at exit)
    return funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), 0, dist.group.WORLD))


def mean(x: torch.Tensor) -> torch.Tensor:
    """The average over ranks of `x` (any shape, the same on every rank), detached: one value every
    rank agrees on."""
    if world() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world()


def from_main(fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0 alone, its picklable result on every rank (e.g. a checkpoint only rank 0's
    disk holds). A SystemExit in `fn` ends every rank: rank 0 with its message, the others quietly with
    status 1, rather than each failing on the collective its peer left (a gloo "Connection closed").
    Raises: SystemExit as above."""
    if world() == 1:
        return fn()
    box: list = [None]
    if is_main():
        try:
            box = [(True, fn())]
        except SystemExit as e:
            box = [(False, e.code)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        code = value if is_main() else 1
        finish()
        raise SystemExit(code)
    return value
