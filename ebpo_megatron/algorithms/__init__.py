"""Pure-torch math of EBPO and its baselines: no global state, no Megatron.

Symbols and every formula: docs/algorithms.md (with the test of each).
"""

from .estimators import (
    GroupAffine,
    compute_advantages,
    estimator_options,
    list_estimators,
    register_estimator,
)
from .dapo import groups_with_signal, overlong_penalty
from .group_table import GroupTable
from .losses import AGGREGATIONS, EntropyMech, aggregate, entropy_from_logits, kl_penalty, policy_loss
from .welford import EBPOPrior, WelfordState

__all__ = [
    "AGGREGATIONS",
    "EBPOPrior",
    "EntropyMech",
    "GroupAffine",
    "GroupTable",
    "WelfordState",
    "aggregate",
    "compute_advantages",
    "entropy_from_logits",
    "estimator_options",
    "groups_with_signal",
    "kl_penalty",
    "list_estimators",
    "overlong_penalty",
    "policy_loss",
    "register_estimator",
]
