"""Logging and progress: a live bar on a terminal, plain lines elsewhere, JSON lines on disk."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

logger = logging.getLogger("haina")


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is when it writes, not what it was when logging was set up.

    Test runners and `contextlib.redirect_stderr` swap `sys.stderr`; a handler that kept the first one would
    write into a capture that has since been closed, and every later message would be lost.
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def setup_logging(debug: bool = False) -> None:
    """Log `haina.*` to stderr; INFO by default, DEBUG with --debug."""
    if logger.handlers:
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    if not debug:
        # Libraries imported along the way that warn about what they cannot use here: torchao (which transformers
        # imports when it is installed) about its CUDA kernels on a CPU build, torch about torchao's registrations.
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)


def info(msg: str) -> None:
    setup_logging()
    logger.info(msg)


def progress(total: int | None = None, desc: str = "", initial: int = 0, unit: str = "it") -> tqdm:
    """A tqdm bar that draws only on a terminal, so logs and CI output stay clean."""
    return tqdm(total=total, desc=desc, initial=initial, unit=unit, disable=not sys.stderr.isatty(),
                dynamic_ncols=True, leave=False)


class JsonlLogger:
    """Appends one JSON object per line; each line is flushed so a crash loses at most one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 — held open for the run; close() closes it

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
