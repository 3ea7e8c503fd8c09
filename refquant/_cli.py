"""Shared pieces of the command-line tools: one-line notes on stderr and progress bars."""
from __future__ import annotations

import sys

from refquant.gguf.file import shorten


def note(msg: str) -> None:
    """One readable line on stderr, however long the names in it (``gguf.file.shorten``)."""
    print(shorten(msg), file=sys.stderr)


def progress_items(items, desc):
    from tqdm import tqdm

    items = list(items)
    return tqdm(items, desc=desc, unit="tensor", disable=None)


def progress_bytes(items, desc):
    """A progress bar over ``gguf.write``'s ``(name, tensor, nbytes)`` items that counts the
    bytes written (MB/s), advancing when each tensor is done."""
    from tqdm import tqdm

    with tqdm(total=sum(n for _, _, n in items), desc=desc, unit="B", unit_scale=True, disable=None) as bar:
        for item in items:
            yield item
            bar.update(item[2])
