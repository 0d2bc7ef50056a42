"""Advantage estimators behind one registry: GRPO, Dr. GRPO, RLOO and EBPO.

Every estimator here is an affine map of the reward inside each group,
    A_{m,i} = α_m · r_{m,i} + β_m,
with (α_m, β_m) computed from the step's :class:`GroupTable` (and, for EBPO, the prior).
That form lets the statistics of the final advantages, and EBPO's batch normalization, be
computed from the O(M) table instead of the O(M·G) rows, so data parallelism needs one
all-gather of the table and nothing else.

Registering your own: ``@register_estimator("name")`` on a function
``fn(table, *, prior, <options>) -> (GroupAffine, metrics)``. Its options are its other keyword
parameters (:func:`estimator_options`): the config's ``algorithm.options`` is checked against
their names and annotations at load, and the signature's defaults are the options' defaults.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch
import torch.distributed as dist

from .group_table import GroupTable, global_group_table, moments_of
from .welford import EBPOPrior, WelfordState


@dataclass(frozen=True)
class GroupAffine:
    """Per-group coefficients: A_{m,i} = scale_m · r_{m,i} + shift_m (float64, length M)."""

    scale: torch.Tensor
    shift: torch.Tensor


class Estimator(Protocol):
    def __call__(
        self, table: GroupTable, *, prior: EBPOPrior | None, **options: object
    ) -> tuple[GroupAffine, dict[str, float]]: ...


_REGISTRY: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Decorator: make ``fn`` selectable as ``compute_advantages(name, ...)``."""

    def decorate(fn: Estimator) -> Estimator:
        if name in _REGISTRY:
            raise ValueError(f"estimator {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorate


def list_estimators() -> list[str]:
    """Names of all registered advantage estimators, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> Estimator:
    """The function registered as ``name``; ValueError (with the closest name) if none is."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"name: unknown estimator {name!r}{hint}; known: {list_estimators()}")
    return _REGISTRY[name]


PER_CALL_INPUTS = ("table", "prior")
"""Parameters of an estimator that ``compute_advantages`` supplies on every call, not options."""


def estimator_options(name: str) -> dict[str, inspect.Parameter]:
    """The options of estimator ``name``: the parameters of its function other than
    :data:`PER_CALL_INPUTS` that can be passed by keyword, in signature order, each with its
    annotation resolved to a type (``typing.Any`` where it has none) and its default
    (``inspect.Parameter.empty``: the option is required)."""
    fn = _lookup(name)
    hints = typing.get_type_hints(fn)
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        p.name: p.replace(annotation=hints.get(p.name, typing.Any))
        for p in inspect.signature(fn).parameters.values()
        if p.kind in keyword and p.name not in PER_CALL_INPUTS
    }


def _require_group_size(table: GroupTable, minimum: int, estimator: str) -> None:
    small = table.count < minimum
    if bool(small.any()):
        bad = table.ids[small][:5].tolist()
        raise ValueError(
            f"group_ids: estimator {estimator!r} needs at least {minimum} responses per group, "
            f"but group id(s) {bad} have {int(table.count[small][0])}"
        )


@register_estimator("grpo")
def grpo(
    table: GroupTable, *, prior: EBPOPrior | None = None, eps: float = 1e-6
) -> tuple[GroupAffine, dict[str, float]]:
    """GRPO: A_{m,i} = (r_{m,i} − μ_m) / (s_m + ε), s_m the unbiased group std. Needs G_m ≥ 2.

    A group whose rewards are all equal gets A = 0 (no gradient).
    """
    _require_group_size(table, 2, "grpo")
    scale = 1.0 / (table.std + eps)
    return GroupAffine(scale, -table.mean * scale), {}


@register_estimator("dr_grpo")
def dr_grpo(
    table: GroupTable, *, prior: EBPOPrior | None = None
) -> tuple[GroupAffine, dict[str, float]]:
    """Dr. GRPO: A_{m,i} = r_{m,i} − μ_m (no division by s_m)."""
    return GroupAffine(torch.ones_like(table.mean), -table.mean), {}


@register_estimator("rloo")
def rloo(
    table: GroupTable, *, prior: EBPOPrior | None = None
) -> tuple[GroupAffine, dict[str, float]]:
    """RLOO: A_{m,i} = r_{m,i} − (1/(G_m−1)) Σ_{j≠i} r_{m,j} = G_m/(G_m−1) · (r_{m,i} − μ_m)."""
    _require_group_size(table, 2, "rloo")
    scale = table.count / (table.count - 1.0)
    return GroupAffine(scale, -table.mean * scale), {}


@register_estimator("ebpo")
def ebpo(
    table: GroupTable,
    *,
    prior: EBPOPrior | None = None,
    eps: float = 1e-6,
    batch_normalize: bool = True,
    tau2: Literal["raw", "bias_corrected"] = "raw",
) -> tuple[GroupAffine, dict[str, float]]:
    """EBPO (docs/algorithms.md; the paper's Algorithm 1), in this order:

    1. update the prior first: W_r ← all rewards of the step, W_μ ← every group mean μ_m;
    2. μ_glob = mean(W_r), σ² = var(W_r), τ² = var(W_μ) ("raw", the paper's form) or
       max(var(W_μ) − σ²/G_m, 0) ("bias_corrected");
    3. S_m = (σ²/G_m) / (σ²/G_m + τ²), S_m = 0 when the denominator is 0;
    4. V_m = (1 − S_m)·μ_m + S_m·μ_glob and a_{m,i} = r_{m,i} − V_m;
    5. with ``batch_normalize``: A = (a − mean(a)) / (std(a) + ε) over all M·G responses of the
       step (std unbiased); else A = a.
    """
    if not isinstance(prior, EBPOPrior):
        raise ValueError("prior: estimator 'ebpo' needs prior=EBPOPrior() (the running W_r, W_μ)")
    if tau2 not in ("raw", "bias_corrected"):
        raise ValueError(f"tau2: expected 'raw' or 'bias_corrected', got {tau2!r}")
    prior.rewards.merge(table.reward_moments())
    prior.group_means.merge(WelfordState.from_values(table.mean))

    group_size = table.count
    sigma2_over_g = prior.sigma2 / group_size
    tau2_m = torch.full_like(group_size, prior.tau2_raw)
    if tau2 == "bias_corrected":
        tau2_m = (tau2_m - sigma2_over_g).clamp(min=0.0)
    denominator = sigma2_over_g + tau2_m
    shrinkage = torch.where(
        denominator > 0, sigma2_over_g / denominator.clamp(min=torch.finfo(torch.float64).tiny), 0.0
    )
    baseline = (1.0 - shrinkage) * table.mean + shrinkage * prior.mu_glob

    scale = torch.ones_like(baseline)
    shift = -baseline
    if batch_normalize:
        # a = r − V_m has group mean μ_m − V_m and the group's own M2: its batch moments follow.
        raw = moments_of(table.count, table.mean - baseline, table.m2)
        scale = scale / (raw.var**0.5 + eps)
        shift = (shift - raw.mean) * scale
    metrics = {
        "ebpo/shrinkage": float(shrinkage.mean()),
        "ebpo/mu_glob": prior.mu_glob,
        "ebpo/sigma2": prior.sigma2,
        "ebpo/tau2": float(tau2_m.mean()),
    }
    return GroupAffine(scale, shift), metrics


def _validate(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D float tensor [N], got {_describe(rewards)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards: expected a floating-point dtype, got {rewards.dtype}")
    if not isinstance(group_ids, torch.Tensor) or group_ids.dim() != 1:
        raise ValueError(f"group_ids: expected a 1-D int64 tensor [N], got {_describe(group_ids)}")
    if group_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"group_ids: expected an integer dtype (int64), got {group_ids.dtype}")
    if rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards and group_ids: shapes differ, {tuple(rewards.shape)} vs {tuple(group_ids.shape)}"
        )
    if not bool(torch.isfinite(rewards).all()):
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten()[:5].tolist()
        raise ValueError(f"rewards: expected finite values, found NaN/inf at index {bad}")
    if group_ids.numel() and int(group_ids.min()) < 0:
        raise ValueError(f"group_ids: expected non-negative ids, found {int(group_ids.min())}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def compute_advantages(
    name: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    prior: EBPOPrior | None = None,
    process_group: dist.ProcessGroup | None = None,
    **options: object,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages A [N] (float32) of estimator ``name`` and a dict of float metrics.

    ``rewards`` r [N] and ``group_ids`` [N] are this rank's rows. With ``process_group`` the
    group statistics, the prior update and any batch normalization cover the rows of all ranks
    of the group (a prompt's responses may sit on several ranks), and each rank's advantages
    equal those of one process over all rows. ``options``: the estimator's own keyword options
    (:func:`estimator_options`; an option not given takes its signature default). Metrics (all
    estimators): ``adv/zero_signal_frac`` (fraction of responses in groups whose rewards are all
    equal), ``adv/mean``, ``adv/std``, ``reward/mean``; identical on every rank.
    """
    estimator = _lookup(name)
    _validate(rewards, group_ids)
    group_ids = group_ids.to(torch.int64)
    table, row = global_group_table(rewards.detach(), group_ids, process_group)
    if table.num_groups == 0:
        raise ValueError("rewards: empty batch (no responses on any rank)")

    affine, metrics = estimator(table, prior=prior, **options)

    advantages = affine.scale.index_select(0, row) * rewards.detach().to(torch.float64) + affine.shift.index_select(0, row)
    final = moments_of(table.count, affine.scale * table.mean + affine.shift,
                       affine.scale**2 * table.m2)
    total = float(table.count.sum())
    zero_signal = float(table.count[table.max == table.min].sum()) / total
    metrics.update({
        "adv/zero_signal_frac": zero_signal,
        "adv/mean": final.mean,
        "adv/std": final.var**0.5,
        "reward/mean": table.reward_moments().mean,
    })
    return advantages.to(torch.float32), metrics
