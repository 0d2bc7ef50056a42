"""Files replaced in one step: whoever reads the path — a resumed run after a kill, a report, a
second process — finds the old content or the new one, never a part of it."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``<path>.tmp`` (parent folders created), then rename it onto ``path``
    (``os.replace``: atomic on one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
