"""Run N ranks of a function on this machine from a notebook or a script, or join the group `torchrun` set up.

`run_ranks(fn, world_size, *args)` spawns `world_size` processes (`torch.multiprocessing`, spawn), each joins one
gloo process group on 127.0.0.1 only, runs `fn(rank, *args)` (the `torch.multiprocessing.spawn` convention) and
sends its return value back; the caller gets the list of them, in rank order. `fn` must live in an importable
module: a spawned process imports it by name, so a function defined in a notebook cell cannot be spawned.

Under `torchrun`, call `init_process_group_from_env()` instead: it reads RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT (env://), as torchrun sets them.
"""

from __future__ import annotations

import datetime
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOOPBACK = "127.0.0.1"
PROCESS_GROUP_TIMEOUT_S = 60.0  # a collective that waits longer (a rank died or diverged) raises instead of hanging
FAILURE_GRACE_S = 5.0  # after a rank fails, how long the others get to finish before they are killed


class RankError(RuntimeError):
    """A rank of `run_ranks` raised (or died, or ran past the timeout); the message names the rank(s)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now: bind port 0 and let the kernel choose."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def loopback_interface() -> str:
    """The name of the loopback interface ('lo' on Linux, 'lo0' on macOS), for GLOO_SOCKET_IFNAME."""
    names = [name for _, name in socket.if_nameindex()]
    for name in ("lo", "lo0"):
        if name in names:
            return name
    raise RuntimeError(f"no loopback interface ('lo' or 'lo0') among {names}; gloo needs one to stay on {LOOPBACK}")


def _check_spawnable(fn) -> None:
    if not callable(fn):
        raise ValueError(f"fn must be a function fn(rank, *args), got {type(fn).__name__}")
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if "<locals>" in qualname or "<lambda>" in qualname or (module == "__main__" and main_file is None):
        raise ValueError(f"fn {qualname or fn!r} cannot be spawned: a spawned process imports it by module and "
                         f"name, so it must be a module-level function of an importable .py file (a function "
                         f"defined in a notebook cell, a lambda or a nested function cannot be)")


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0, threads: int = 1,
              pg_timeout: float = PROCESS_GROUP_TIMEOUT_S) -> list:
    """Run `fn(rank, *args)` on `world_size` gloo ranks on 127.0.0.1; returns [result of rank 0, rank 1, ...].

    Each rank runs with `threads` intra-op threads (ranks share the cores) and a process-group timeout of
    `pg_timeout` seconds. A rank that raises is a `RankError` naming it, with its traceback; the other ranks get
    a few seconds to finish, then are killed. Past `timeout` seconds every rank still running is killed (by PID)
    and a `RankError` names them: a hang fails, it never blocks the caller. Return values must be picklable.
    """
    _check_spawnable(fn)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    for name, value in (("timeout", timeout), ("pg_timeout", pg_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    context = mp.get_context("spawn")
    results_dir = tempfile.mkdtemp(prefix="moelab-ranks-")
    port = free_port()
    processes = [context.Process(target=_rank_main, daemon=True, name=f"moelab-rank-{rank}",
                                 args=(fn, rank, world_size, port, args, results_dir, threads, pg_timeout))
                 for rank in range(world_size)]
    try:
        for process in processes:
            process.start()
        timed_out = _wait(processes, timeout)
        return _collect(processes, results_dir, timed_out, timeout)
    finally:
        for process in processes:
            _kill(process)
        shutil.rmtree(results_dir, ignore_errors=True)


def _wait(processes, timeout: float) -> list[int]:
    """Wait until every rank exits, or a rank fails (then the grace), or the timeout; returns the ranks killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [process.exitcode for process in processes]
        if all(code is not None for code in codes):
            return []
        if any(code not in (None, 0) for code in codes):  # the others may wait on it in a collective: cut short
            deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        time.sleep(0.05)
    running = [rank for rank, process in enumerate(processes) if process.exitcode is None]
    for rank in running:
        _kill(processes[rank])
    return running


def _kill(process) -> None:
    if process.pid is not None and process.exitcode is None:
        process.kill()  # SIGKILL to this child's PID, nothing else
        process.join(5.0)


def _collect(processes, results_dir: str, killed: list[int], timeout: float) -> list:
    results, failures = [], []
    for rank, process in enumerate(processes):
        path = os.path.join(results_dir, f"rank{rank}.pkl")
        outcome = None
        if os.path.exists(path):
            with open(path, "rb") as file:
                outcome = pickle.load(file)
        if outcome is not None and outcome[0] == "ok":
            results.append(outcome[1])
            continue
        results.append(None)
        if outcome is not None:
            failures.append((outcome[2], f"rank {rank} raised {outcome[1]}"))
        elif rank in killed:
            failures.append((float("inf"), f"rank {rank} was still running and was killed"))
        else:
            failures.append((float("inf"), f"rank {rank} exited with code {process.exitcode} without a result"))
    if failures:
        # NOTE: the first to raise first: its peers usually fail because of it (a closed connection, a timeout)
        failures.sort(key=lambda failure: failure[0])
        note = f" (timeout {timeout} s)" if killed else ""
        raise RankError(f"{len(failures)} of {len(processes)} ranks failed{note}, the first to raise first:\n"
                        + "\n".join(line for _, line in failures))
    return results


def _rank_main(fn, rank, world_size, port, args, results_dir, threads, pg_timeout) -> None:
    """One spawned rank: join the group on 127.0.0.1, run fn, write ("ok", value) or ("error", text)."""
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME=loopback_interface())  # gloo's pairs on loopback too
    torch.set_num_threads(threads)
    path = os.path.join(results_dir, f"rank{rank}.pkl")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{LOOPBACK}:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        value = fn(rank, *args)
        payload = pickle.dumps(("ok", value))
        dist.barrier()  # NOTE: rank 0 hosts the store; nobody leaves while a peer may still need it
    except BaseException as error:  # noqa: BLE001 - everything goes back to the caller, named by rank
        payload = pickle.dumps(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}", time.time()))
    _write(path, payload)
    if dist.is_initialized():
        dist.destroy_process_group()
    failed = pickle.loads(payload)[0] != "ok"
    sys.exit(1 if failed else 0)


def _write(path: str, payload: bytes) -> None:
    partial = path + ".partial"
    with open(partial, "wb") as file:
        file.write(payload)
    os.replace(partial, path)  # whole or absent: the parent never reads half a result


def init_process_group_from_env(backend: str | None = None,
                                timeout: float = PROCESS_GROUP_TIMEOUT_S) -> tuple[int, int]:
    """Join the process group `torchrun` describes in RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; returns
    (rank, world_size). `backend`: None picks NCCL where CUDA is available, else gloo. A no-op if already joined.

        torchrun --standalone --nproc-per-node 2 my_script.py
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(f"environment variables {missing} are not set: run the script under torchrun "
                           f"(torchrun --standalone --nproc-per-node 2 script.py), or use run_ranks from a notebook")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if os.environ["MASTER_ADDR"] in (LOOPBACK, "localhost") and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()  # one machine: gloo's connections stay on loopback
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()
