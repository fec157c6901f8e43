"""Long embedding jobs: embed many files in chunks and report progress, and a one-line progress display.

The library reports progress through a callback (`on_progress(done, total)`); only the CLI draws it,
with `ProgressLine` on stderr, so stdout stays clean for tables and JSON.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from client.embedding_client import EmbeddingClient, InvalidInputError, embed_files

ProgressCallback = Callable[[int, int], None]


def embed_with_progress(
    client: EmbeddingClient,
    paths: Sequence[Path],
    batch_size: int = 16,
    concurrency: int = 4,
    on_progress: ProgressCallback | None = None,
) -> np.ndarray:
    """`embed_files` over `paths`, a few rounds of concurrent batches at a time, reporting after each."""
    if not paths:
        raise InvalidInputError("no images to embed")
    chunk = batch_size * concurrency * 4  # enough requests in flight to keep the server busy between reports
    parts = []
    for start in range(0, len(paths), chunk):
        parts.append(embed_files(client, paths[start : start + chunk], batch_size=batch_size, concurrency=concurrency))
        if on_progress is not None:
            on_progress(min(start + chunk, len(paths)), len(paths))
    return np.concatenate(parts)


class ProgressLine:
    """`label: done/total (percent) rate, ETA` on one stderr line, redrawn in place on a terminal.

    When the stream is not a terminal (a log file, CI), only the final line is written, so logs do
    not fill with carriage returns.
    """

    def __init__(self, label: str, stream: TextIO | None = None, min_interval_s: float = 0.2):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval_s = min_interval_s
        self._started = time.perf_counter()
        self._last_drawn = 0.0
        self._interactive = self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        finished = done >= total
        if not finished and (not self._interactive or now - self._last_drawn < self.min_interval_s):
            return
        self._last_drawn = now
        elapsed = now - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        remaining = f", ETA {(total - done) / rate:.0f} s" if rate > 0 and not finished else ""
        line = f"{self.label}: {done}/{total} ({100 * done / total:.0f}%) {rate:.0f} img/s{remaining}"
        self.stream.write(("\r" if self._interactive else "") + line + ("\n" if finished else ""))
        self.stream.flush()
