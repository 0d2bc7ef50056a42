"""ebpo_megatron: Empirical Bayes Policy Optimization (EBPO) for RLVR on Megatron-Core.

Layers (imports point downward only): ``algorithms`` (pure torch math) -> ``parallel`` ->
``models`` -> ``rollout`` -> ``data`` / ``rewards`` -> ``trainer``. See docs/architecture.md.
"""

__version__ = "0.1.0"
