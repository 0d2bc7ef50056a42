"""Typed configuration loaded from YAML (``typed``: the mechanism; ``schema``: the sections)."""
