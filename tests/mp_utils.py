"""Spawn N gloo ranks on localhost for a test and collect what each returns."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, outdir: str, fn: Callable, args: tuple) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        result = {"ok": True, "value": fn(rank, world, *args)}
    except BaseException:  # noqa: BLE001 - reported to the parent test
        result = {"ok": False, "error": traceback.format_exc()}
    finally:
        from ebpo_megatron.parallel import shutdown

        try:
            shutdown()
        except Exception:  # noqa: BLE001
            pass
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(fn: Callable, world: int, *args: Any, env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes (RANK/WORLD_SIZE/MASTER_*
    set, as torchrun would; ``env`` added to the environment they start with, e.g.
    CUDA_VISIBLE_DEVICES=""); returns each rank's return value, or fails with its traceback."""
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        with tempfile.TemporaryDirectory() as outdir:
            mp.spawn(_worker, args=(world, free_port(), outdir, fn, args), nprocs=world, join=True)
            results = []
            for rank in range(world):
                with open(os.path.join(outdir, f"rank{rank}.pkl"), "rb") as f:
                    results.append(pickle.load(f))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    failures = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if not res["ok"]]
    if failures:
        raise AssertionError("\n".join(failures))
    return [res["value"] for res in results]
