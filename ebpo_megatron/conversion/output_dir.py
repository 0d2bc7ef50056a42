"""The converters' output directory: checked first, written beside, renamed into place.

Nothing is lost that the user did not ask to replace:
  * an ``--out`` that is, contains or lies inside one of the conversion's inputs (symlinks
    resolved) is refused, even with ``overwrite``: replacing it would destroy what is read;
  * an existing ``--out`` that is not an empty directory is refused unless ``overwrite``;
  * the result is written into a new temporary directory beside ``--out`` (a unique hidden
    name, so no other folder is touched) and renamed onto ``--out`` when complete; after an
    error the temporary directory is removed and ``--out`` is as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputDirError(ValueError):
    """The output directory cannot be written; the message names the path and why."""


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_dir(out_dir: Path, inputs: Iterable[Path], overwrite: bool = False) -> Path:
    """The resolved ``out_dir`` if a conversion reading ``inputs`` may write it (see the module
    docstring); else :class:`OutputDirError`."""
    out = Path(out_dir).resolve()
    for given in inputs:
        source = Path(given).resolve()
        relation = ("is" if out == source else "contains" if source.is_relative_to(out)
                    else "is inside" if out.is_relative_to(source) else None)
        if relation is not None:
            raise OutputDirError(f"{out_dir}: the output directory {relation} the input {given}; choose another "
                                 "--out (refused even with --overwrite)")
    if out.exists() and not overwrite and not _is_empty_dir(out):
        raise OutputDirError(f"{out_dir}: the output directory exists and is not empty; --overwrite replaces it")
    return out


@contextmanager
def staged_output(out_dir: Path, inputs: Iterable[Path], overwrite: bool = False) -> Iterator[Path]:
    """Check ``out_dir`` (:func:`check_output_dir`), yield a new temporary directory beside it,
    and rename that onto ``out_dir`` when the block completes (an existing ``out_dir``, allowed
    by ``overwrite``, is moved aside first and deleted last); after an error it is removed."""
    out = check_output_dir(out_dir, inputs, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if not out.exists() or _is_empty_dir(out):
            os.replace(tmp, out)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
