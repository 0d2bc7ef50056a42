"""compute_advantages with a gloo process group (2 and 4 ranks on localhost) equals one process.

Each rank gets an uneven shard of one global batch (groups split across ranks), calls
compute_advantages("ebpo", ..., prior=prior, process_group=WORLD) for 3 consecutive steps, and
grpo / rloo / dr_grpo. Results come back through pickle files in tmp_path.
"""

import datetime
import os
import pickle
import socket
import time
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ebpo_megatron.algorithms import EBPOPrior, compute_advantages
from reference_impl import RefPrior, ref_ebpo_step, ref_grpo

N_STEPS = 3
EBPO_VARIANTS = {
    "ebpo_default": {},
    "ebpo_bc_raw": {"tau2": "bias_corrected", "batch_normalize": False},
}
BASELINES = ["grpo", "rloo", "dr_grpo"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batches(seed):
    """3 steps of (rewards, group_ids), rows shuffled so that groups straddle rank boundaries."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(N_STEPS):
        sizes = [4, 4, 2, 8, 3, 4, 5, 16, 4, 6][: 7 + step]
        ids = rng.choice(np.arange(3, 10**6), size=len(sizes), replace=False)
        ids[:3] = [7, 1003, 42]
        rewards, gids = [], []
        for k, (gid, G) in enumerate(zip(ids, sizes)):
            if k == 1:
                vals = [0.0] * G  # an all-fail group
            elif step == 1 and k % 2 == 0:
                vals = [float(np.float32(v)) for v in rng.normal(0.5, 1.0, G)]  # shaped rewards
            else:
                vals = [float(rng.random() < 0.3 + 0.2 * step) for _ in range(G)]
            rewards += vals
            gids += [int(gid)] * G
        perm = rng.permutation(len(rewards))
        out.append((np.array(rewards)[perm], np.array(gids, dtype=np.int64)[perm]))
    return out


def _shard_bounds(n, world):
    """Uneven, non-empty contiguous shards in rank order."""
    weights = np.array([1.0, 2.7, 1.6, 3.3][:world])
    cuts = np.round(np.cumsum(weights) / weights.sum() * n).astype(int)
    bounds = [0, *cuts.tolist()]
    bounds[-1] = n
    assert all(b > a for a, b in zip(bounds[:-1], bounds[1:]))
    return bounds


def _run_all(rewards_steps, gids_steps, process_group=None):
    """The calls every rank makes (and the single process makes on the concatenation)."""
    priors = {k: EBPOPrior() for k in EBPO_VARIANTS}
    results = []
    for r_np, g_np in zip(rewards_steps, gids_steps):
        r = torch.tensor(r_np, dtype=torch.float32)
        g = torch.tensor(g_np, dtype=torch.int64)
        step = {}
        for key, opts in EBPO_VARIANTS.items():
            adv, metrics = compute_advantages("ebpo", r, g, prior=priors[key], process_group=process_group, **opts)
            step[key] = (adv.numpy().copy(), dict(metrics), priors[key].state_dict())
        for name in BASELINES:
            adv, metrics = compute_advantages(name, r, g, process_group=process_group)
            step[name] = (adv.numpy().copy(), dict(metrics), None)
        results.append(step)
    return results


def _worker(rank, world, port, shards, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        import torch.distributed as dist

        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=40))
        try:
            rewards_steps = [s[0] for s in shards[rank]]
            gids_steps = [s[1] for s in shards[rank]]
            results = _run_all(rewards_steps, gids_steps, process_group=dist.group.WORLD)
        finally:
            dist.destroy_process_group()
        with open(path, "wb") as f:
            pickle.dump({"ok": True, "results": results}, f)
    except BaseException:
        with open(path, "wb") as f:
            pickle.dump({"ok": False, "error": traceback.format_exc()}, f)
        raise


def _spawn(world, shards, out_dir, deadline_s=55.0):
    ctx = mp.get_context("spawn")
    port = _free_port()
    old_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children at start-up
    try:
        procs = [ctx.Process(target=_worker, args=(r, world, port, shards, str(out_dir)), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
    finally:
        if old_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_omp
    t0 = time.monotonic()
    for p in procs:
        p.join(timeout=max(0.1, deadline_s - (time.monotonic() - t0)))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:  # only the processes started here, by their own handle
        p.kill()
        p.join(5)
    outs = []
    for r in range(world):
        path = out_dir / f"rank{r}.pkl"
        if not path.exists():
            pytest.fail(f"rank {r} wrote no result (exit code {procs[r].exitcode}, timed out: {bool(alive)})")
        with open(path, "rb") as f:
            res = pickle.load(f)
        if not res["ok"]:
            pytest.fail(f"rank {r} failed:\n{res['error']}")
        outs.append(res["results"])
    assert not alive, "ranks did not finish in time"
    return outs


def _close_rel(a, b, rel):
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_equals_single_process(world, tmp_path):
    batches = _global_batches(seed=100 + world)
    bounds = [_shard_bounds(len(r), world) for r, _ in batches]
    shards = [[(r[b[k]:b[k + 1]].copy(), g[b[k]:b[k + 1]].copy()) for (r, g), b in zip(batches, bounds)]
              for k in range(world)]
    # the set-up really splits groups across ranks
    for (r, g), b in zip(batches, bounds):
        owners = {}
        for k in range(world):
            for gid in set(g[b[k]:b[k + 1]].tolist()):
                owners.setdefault(gid, set()).add(k)
        assert any(len(v) > 1 for v in owners.values())

    outs = _spawn(world, shards, tmp_path)
    single = _run_all([r for r, _ in batches], [g for _, g in batches])

    # independent float64 reference for the single-process EBPO run (defaults) and GRPO
    ref_prior = RefPrior()
    for step, (r, g) in enumerate(batches):
        want, _, _ = ref_ebpo_step(r, g, ref_prior)
        np.testing.assert_allclose(single[step]["ebpo_default"][0].astype(np.float64), want, atol=1e-6)
        np.testing.assert_allclose(single[step]["grpo"][0].astype(np.float64), ref_grpo(r, g), atol=1e-6)

    for step in range(N_STEPS):
        b = bounds[step]
        for key in [*EBPO_VARIANTS, *BASELINES]:
            s_adv, s_metrics, s_prior = single[step][key]
            m0 = outs[0][step][key][1]
            p0 = outs[0][step][key][2]
            for rank in range(world):
                adv, metrics, prior_sd = outs[rank][step][key]
                # advantages: the matching slice of the single-process result
                assert adv.dtype == np.float32
                np.testing.assert_allclose(adv.astype(np.float64), s_adv[b[rank]:b[rank + 1]].astype(np.float64),
                                           rtol=0, atol=1e-6, err_msg=f"{key} step {step} rank {rank}")
                # metrics: identical on every rank, and equal to the single process
                assert metrics == m0, (key, step, rank, metrics, m0)
                assert set(metrics) == set(s_metrics), (key, set(metrics) ^ set(s_metrics))
                for mk, mv in s_metrics.items():
                    tol_abs = 1e-6 if mk.startswith("adv/") else 1e-12
                    assert abs(metrics[mk] - mv) <= max(tol_abs, 1e-9 * abs(mv)), (key, step, rank, mk,
                                                                                    metrics[mk], mv)
                if prior_sd is None:
                    continue
                # prior: bit-identical on every rank ...
                assert prior_sd == p0, (key, step, rank, prior_sd, p0)
                # ... and equal to the single-process prior to 1e-12
                for acc in ("rewards", "group_means"):
                    assert prior_sd[acc]["count"] == s_prior[acc]["count"]
                    for field in ("mean", "m2"):
                        assert _close_rel(prior_sd[acc][field], s_prior[acc][field], 1e-12), (
                            key, step, acc, field, prior_sd[acc][field], s_prior[acc][field])
        # the prior counted every group once over all ranks, and every response once
        for rank in range(world):
            sd = outs[rank][step]["ebpo_default"][2]
            assert sd["group_means"]["count"] == sum(len(set(g.tolist())) for _, g in batches[: step + 1])
            assert sd["rewards"]["count"] == sum(len(r) for r, _ in batches[: step + 1])
