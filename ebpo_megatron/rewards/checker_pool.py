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
* an exception raised by the checker comes back as ``error="<Type>: <message>"``;
* with a per-batch budget (``run(..., budget_s=)``), whatever has not finished when the budget is
  spent gets ``error=OVER_BUDGET`` (its worker killed and replaced as for a timeout), so a batch
  of distinct pathological answers costs at most the budget, not one timeout per answer.

The checker is a module-level function, given as the function itself or as ``"module:name"``;
each worker imports it once at start and calls ``warmup`` (if given) before it reports ready.
``returns="bool"`` (the math checker) makes every verdict a bool; ``returns="value"`` (a user
reward, see safe.py) sends back the number the function returned (the ``repr`` of anything
else, so a reply can always be pickled). Per-task overhead is one socket round trip (about
0.1 ms; see the rewards tests).

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
from typing import Any, Callable, Literal, Sequence

Checker = Callable[[str, str], Any]

OVER_BUDGET = "over the batch budget"
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


def check_sendable(checker: Checker | str) -> None:
    """Raise ValueError unless ``checker`` can reach a worker process: a ``"module:function"``
    path that imports, or a function importable by name (not a lambda, a closure, a bound
    method of an unpicklable object, or anything defined in the caller's ``__main__``, which
    workers never import)."""
    if not callable(checker):
        resolve_checker(checker)
        return
    name = getattr(checker, "__qualname__", type(checker).__name__)
    if getattr(checker, "__module__", None) == "__main__":
        raise ValueError(f"{name} is defined in __main__, which worker processes do not import: "
                         "move it to an importable module")
    try:
        pickle.dumps(checker)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise ValueError(f"{name} cannot be sent to a worker process ({type(err).__name__}: {err}): give a "
                         "module-level function (or 'module:function'), not a lambda, closure or local "
                         "function") from err


def _plain(value: Any) -> Any:
    """A user reward's return value as the worker sends it: a number as is, else its repr."""
    return value if isinstance(value, (int, float)) else repr(value)[:200]


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
        checker_ref, warmup, memory_limit_mb, parent_pid, returns = conn.recv()
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
            value = checker(gold, pred)
            verdict, error = (bool(value) if returns == "bool" else _plain(value)), None
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
    """``verdict`` of one check (a bool; with ``returns="value"`` the returned number or the repr
    of anything else; False after an error); ``error`` is None, "timeout", OVER_BUDGET,
    "worker died ..." or an exception text."""

    verdict: Any
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
        returns: Literal["bool", "value"] = "bool",
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers: expected >= 1, got {num_workers}")
        check_sendable(checker)  # fail here, not in every worker
        self._checker_ref = checker
        self._returns = returns
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
        conn.send((self._checker_ref, self._warmup, self._memory_limit_mb, parent_pid, self._returns))
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

    def run(self, tasks: Sequence[tuple[str, str]], timeout_s: float,
            budget_s: float | None = None) -> list[CheckOutcome]:
        """Check every ``(gold, pred)``; results in input order. Each task gets ``timeout_s``;
        the whole call ``budget_s`` (None: no limit), after which every unfinished task gets
        ``error=OVER_BUDGET`` and the workers still busy are replaced.

        Task ids grow over the pool's life, so a reply to a task of an earlier call that was
        interrupted (an exception, Ctrl-C) is recognized and dropped, never taken for this one.
        """
        if self._closed:
            raise RuntimeError("CheckerPool is closed")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s}")
        if budget_s is not None and budget_s <= 0:
            raise ValueError(f"budget_s: expected > 0 or None, got {budget_s}")
        budget_end = time.monotonic() + budget_s if budget_s is not None else float("inf")
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
            wait_for = min(min((w.deadline for w in busy), default=now + 1.0), budget_end) - now
            handles = [w.conn for w in self._workers if w.task is not None or not w.ready]
            ready_handles = set(wait(handles, timeout=max(0.0, wait_for)))
            for i, w in enumerate(list(self._workers)):
                if w.conn in ready_handles:
                    self._handle_message(i, results)
            now = time.monotonic()
            for i, w in enumerate(list(self._workers)):
                if w.task is not None and w.task not in results and (now >= w.deadline or now >= budget_end):
                    results[w.task] = CheckOutcome(False, "timeout" if now >= w.deadline else OVER_BUDGET)
                    self._replace(i)
            if now >= budget_end:
                for task_id in pending:
                    results[task_id] = CheckOutcome(False, OVER_BUDGET)
                pending.clear()
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
