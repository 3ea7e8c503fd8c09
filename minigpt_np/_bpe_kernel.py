"""The BPE merge loop compiled with numba, for long pre-token pieces (``Tokenizer._bpe``).

Symbols are token ids (every merge of a proper BPE vocabulary yields a token, and its
parts are tokens), merges a sorted table of keys ``left·V + right`` with their rank and
result id. The loop is the one in ``Tokenizer._bpe``: a binary heap of ``rank·2^32 +
position`` over a linked list of symbols, stale entries skipped when popped. Pieces of a
million characters take about a second instead of minutes (the quadratic loop) or
several seconds (the same loop in Python).
"""
from __future__ import annotations

import numpy as np
from numba import njit

SHIFT = 32


@njit(cache=False)
def _lookup(a, b, vocab, keys, n_keys):
    if a < 0 or b < 0:
        return -1
    key = a * vocab + b
    k = np.searchsorted(keys, key)
    if k < n_keys and keys[k] == key:
        return k
    return -1


@njit(cache=False)
def _push(heap, size, key):
    i = size
    heap[i] = key
    while i > 0:
        parent = (i - 1) >> 1
        if heap[parent] <= heap[i]:
            break
        heap[parent], heap[i] = heap[i], heap[parent]
        i = parent
    return size + 1


@njit(cache=False)
def _pop(heap, size):
    top = heap[0]
    size -= 1
    heap[0] = heap[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        child = left
        if left + 1 < size and heap[left + 1] < heap[left]:
            child = left + 1
        if heap[i] <= heap[child]:
            break
        heap[i], heap[child] = heap[child], heap[i]
        i = child
    return top, size


@njit(cache=False)
def merge(sym, vocab, keys, ranks, results):
    """BPE of the token ids ``sym`` (−1 for a byte the vocabulary lacks): the ids left after
    every merge, in order, without the −1s."""
    n = sym.shape[0]
    sym = sym.copy()
    nxt = np.arange(1, n + 1)
    prv = np.arange(-1, n - 1)
    heap = np.empty(3 * n + 1, np.int64)
    size = 0
    m = keys.shape[0]
    mask = (np.int64(1) << SHIFT) - 1
    for i in range(n - 1):
        k = _lookup(sym[i], sym[i + 1], vocab, keys, m)
        if k >= 0:
            size = _push(heap, size, (ranks[k] << SHIFT) | i)
    while size > 0:
        key, size = _pop(heap, size)
        r = key >> SHIFT
        i = key & mask
        j = nxt[i]
        if sym[i] == -2 or j >= n:
            continue
        k = _lookup(sym[i], sym[j], vocab, keys, m)
        if k < 0 or ranks[k] != r:   # stale: a neighbour merged since
            continue
        sym[i] = results[k]
        sym[j] = -2
        nj = nxt[j]
        nxt[i] = nj
        if nj < n:
            prv[nj] = i
            k2 = _lookup(sym[i], sym[nj], vocab, keys, m)
            if k2 >= 0:
                size = _push(heap, size, (ranks[k2] << SHIFT) | i)
        h = prv[i]
        if h >= 0:
            k3 = _lookup(sym[h], sym[i], vocab, keys, m)
            if k3 >= 0:
                size = _push(heap, size, (ranks[k3] << SHIFT) | h)
    out = np.empty(n, np.int64)
    count = 0
    i = 0
    while i < n:
        if sym[i] >= 0:
            out[count] = sym[i]
            count += 1
        i = nxt[i]
    return out[:count]


def tables(tokens_to_id: dict, ranks: dict):
    """``(vocab, keys, ranks, results)``: the merges sorted by key ``left·vocab + right``, or
    None when some merge's parts or result is not a token (then the Python loop, which
    handles that, is used)."""
    vocab = max(tokens_to_id.values(), default=0) + 1
    rows = []
    for (a, b), r in ranks.items():
        ia, ib, ic = tokens_to_id.get(a), tokens_to_id.get(b), tokens_to_id.get(a + b)
        if ia is None or ib is None or ic is None:
            return None
        rows.append((ia * vocab + ib, r, ic))
    rows.sort()
    arr = np.array(rows, np.int64).reshape(-1, 3)
    return vocab, np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1]), np.ascontiguousarray(arr[:, 2])
