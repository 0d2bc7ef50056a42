"""A persistent pool of worker processes that run ``checker(gold, pred) -> bool`` with a hard timeout.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot kill one stuck task — a killed
worker breaks the whole pool. Here every worker is a fresh interpreter (``subprocess`` running
``python -c``, the equivalent of the ``spawn`` start method; never ``fork``: the trainer process
holds threads) talking over its own socket pair, one task at a time, so:

* a task's clock starts when it is sent to a worker; a task still running ``timeout_s`` later
  gets the verdict ``error="timeout"``, its worker is killed (SIGKILL) and a replacement is
  started in the background while the other workers go on;
* a worker that dies (segfault, out of memory under ``memory_limit_mb``) gives its task
  ``error="worker died (exit code N)"`` and is replaced the same way;
* an exception raised by the checker comes back as ``error="<Type>: <message>"``.

The checker is a module-level function, given as the function itself or as ``"module:name"``;
each worker imports it once at start and calls ``warmup`` (if given) before it reports ready.
Per-task overhead is one socket round trip (about 0.1 ms; see the rewards tests).

Unlike ``multiprocessing``'s ``spawn``/``forkserver``, the workers never re-import the caller's
``__main__``, so a script without an ``if __name__ == "__main__"`` guard (or a notebook) works.
The parent's ``sys.path`` is sent to each worker first, so checkers defined in test modules or
user packages import there as they do here. On Linux, workers started from the main thread
are killed with their parent (``PR_SET_PDEATHSIG``), even in the middle of a stuck check.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Callable, Sequence

Checker = Callable[[str, str], bool]

_READY = "__ready__"
_FATAL = "__fatal__"

# The worker's entry: stdlib only until sys.path is the parent's, then our worker loop.
_BOOTSTRAP = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "sys.path[:] = conn.recv()\n"
    "from ebpo_megatron.rewards.checker_pool import _worker_main\n"
    "_worker_main(conn)\n"
)


def resolve_checker(checker: Checker | str) -> Checker:
    """A checker from a callable or a ``"module:function"`` path."""
    if callable(checker):
        return checker
    module_name, _, attr = str(checker).partition(":")
    if not attr:
        raise ValueError(f"checker: expected a callable or 'module:function', got {checker!r}")
    return getattr(importlib.import_module(module_name), attr)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the thread that started it exits (best effort elsewhere).

    The parent only asks for this when it starts workers from its main thread (the signal
    follows the creating *thread*). Otherwise, and off Linux, a worker exits when its socket
    reports EOF, i.e. at its next read after the parent is gone.
    """
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 — not Linux
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _worker_main(conn: Connection) -> None:
    """Worker loop: receive ``(task_id, gold, pred)``, send ``(task_id, verdict, error)``."""
    try:
        checker_ref, warmup, memory_limit_mb, parent_pid = conn.recv()
        if parent_pid is not None:
            _die_with_parent(parent_pid)
        if memory_limit_mb:
            import resource

            limit = int(memory_limit_mb) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        checker = resolve_checker(checker_ref)
        warm = getattr(checker, "warmup", None)
        if warmup and callable(warm):
            warm()
    except BaseException as exc:  # report why the worker cannot start, then exit
        conn.send((_FATAL, None, f"{type(exc).__name__}: {exc}"))
        return
    conn.send((_READY, None, None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, gold, pred = message
        try:
            verdict, error = bool(checker(gold, pred)), None
        except MemoryError:
            verdict, error = False, "MemoryError"
        except Exception as exc:  # noqa: BLE001 — any checker failure is a verdict, not a crash
            verdict, error = False, f"{type(exc).__name__}: {str(exc)[:300]}"
        try:
            conn.send((task_id, verdict, error))
        except (EOFError, OSError):
            return


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0

    def kill(self) -> int | None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self.conn.close()
        return code


@dataclass(frozen=True)
class CheckOutcome:
    """``verdict`` of one check; ``error`` is None, "timeout", "worker died ..." or an exception text."""

    verdict: bool
    error: str | None = None


class WorkerStartError(RuntimeError):
    """A worker could not import or warm up its checker."""


class CheckerPool:
    """``num_workers`` persistent processes running one checker, each task under a hard timeout."""

    def __init__(
        self,
        checker: Checker | str,
        num_workers: int = 2,
        *,
        memory_limit_mb: int | None = 4096,
        warmup: bool = True,
        start_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers: expected >= 1, got {num_workers}")
        if not callable(checker):
            resolve_checker(checker)  # fail here, not in every worker, on a bad path
        else:
            pickle.dumps(checker)  # a lambda or closure cannot reach the workers
        self._checker_ref = checker
        self._memory_limit_mb = memory_limit_mb
        self._warmup = warmup
        self._start_timeout_s = start_timeout_s
        self._workers: list[_Worker] = [self._start_worker() for _ in range(num_workers)]
        self.replaced = 0  # workers killed or lost and restarted, over the pool's life
        self._next_task_id = 0
        self._closed = False
        _LIVE_POOLS.add(self)

    # -- lifecycle -------------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        child_fd = child_sock.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, str(child_fd)],
            pass_fds=(child_fd,),
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
        child_sock.close()
        conn = Connection(parent_sock.detach())
        conn.send(list(sys.path))
        from_main_thread = threading.current_thread() is threading.main_thread()
        parent_pid = os.getpid() if from_main_thread else None
        conn.send((self._checker_ref, self._warmup, self._memory_limit_mb, parent_pid))
        return _Worker(proc, conn)

    def _replace(self, index: int) -> None:
        self._workers[index].kill()
        self._workers[index] = self._start_worker()
        self.replaced += 1

    def wait_ready(self) -> None:
        """Block until every worker has reported ready (raises WorkerStartError on failure)."""
        deadline = time.monotonic() + self._start_timeout_s
        for i in range(len(self._workers)):
            while not self._workers[i].ready:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerStartError(f"reward worker not ready after {self._start_timeout_s:.0f} s")
                worker = self._workers[i]
                if wait([worker.conn], timeout=remaining):
                    self._handle_message(i, {})

    def close(self) -> None:
        """Stop every worker (politely, then by SIGKILL)."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            try:
                worker.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            worker.kill()
        _LIVE_POOLS.discard(self)

    def __enter__(self) -> "CheckerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    # -- running ---------------------------------------------------------------------------
    def _handle_message(self, index: int, results: dict[int, CheckOutcome]) -> None:
        """Read one message (or the death) of worker ``index``; results are keyed by task id."""
        worker = self._workers[index]
        try:
            task_id, verdict, error = worker.conn.recv()
        except (EOFError, OSError):  # the worker's end closed: it died
            task, was_ready = worker.task, worker.ready
            code = worker.kill()
            if not was_ready:
                raise WorkerStartError(f"reward worker exited at start (exit code {code})")
            if task is not None:
                results[task] = CheckOutcome(False, f"worker died (exit code {code})")
            self._workers[index] = self._start_worker()
            self.replaced += 1
            return
        if task_id == _FATAL:
            worker.kill()
            raise WorkerStartError(f"reward worker could not start its checker: {error}")
        if task_id == _READY:
            worker.ready = True
            return
        results[task_id] = CheckOutcome(verdict, error)
        worker.task = None

    def run(self, tasks: Sequence[tuple[str, str]], timeout_s: float) -> list[CheckOutcome]:
        """Check every ``(gold, pred)``; results in input order. Each task gets ``timeout_s``.

        Task ids grow over the pool's life, so a reply to a task of an earlier call that was
        interrupted (an exception, Ctrl-C) is recognized and dropped, never taken for this one.
        """
        if self._closed:
            raise RuntimeError("CheckerPool is closed")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        base = self._next_task_id
        self._next_task_id += len(tasks)
        pending = deque(range(base, base + len(tasks)))
        results: dict[int, CheckOutcome] = {}

        def finished() -> int:
            return sum(1 for task_id in results if task_id >= base)

        start_deadline = time.monotonic() + self._start_timeout_s
        while finished() < len(tasks):
            now = time.monotonic()
            for i, worker in enumerate(list(self._workers)):
                if worker.ready and worker.task is None and pending:
                    task_id = pending.popleft()
                    gold, pred = tasks[task_id - base]
                    try:
                        worker.conn.send((task_id, gold, pred))
                    except OSError:  # died while idle: retry elsewhere
                        pending.appendleft(task_id)
                        self._replace(i)
                        continue
                    worker.task = task_id
                    worker.deadline = now + timeout_s
            busy = [w for w in self._workers if w.task is not None]
            if not busy and not any(w.ready for w in self._workers) and now > start_deadline:
                raise WorkerStartError(f"no reward worker ready after {self._start_timeout_s:.0f} s")
            wait_for = min((w.deadline for w in busy), default=now + 1.0) - now
            handles = [w.conn for w in self._workers if w.task is not None or not w.ready]
            ready_handles = set(wait(handles, timeout=max(0.0, wait_for)))
            for i, w in enumerate(list(self._workers)):
                if w.conn in ready_handles:
                    self._handle_message(i, results)
            now = time.monotonic()
            for i, w in enumerate(list(self._workers)):
                if w.task is not None and now >= w.deadline and w.task not in results:
                    results[w.task] = CheckOutcome(False, "timeout")
                    self._replace(i)
        return [results[task_id] for task_id in range(base, base + len(tasks))]


_LIVE_POOLS: "weakref.WeakSet[CheckerPool]" = weakref.WeakSet()


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_LIVE_POOLS):
        try:
            pool.close()
        except Exception:  # noqa: BLE001 — best effort at interpreter exit
            pass


def default_num_workers() -> int:
    """``min(4, cores - 1)``, at least 1: leave a core to the trainer process."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))
