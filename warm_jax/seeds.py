"""Randomness derived by name from the run's one root seed.

Every random stream of a run (a member's init and data order, a split's prompts, a policy's samples) is named by a
path such as ``("data", "validation", "prompts", 3)``. Its key is ``fold_in`` of the root key with a 32-bit hash of
each path element in turn, so streams never collide by arithmetic accident (``seed * 1000 + i`` collides once
members outnumber the stride), adding a stream changes no other stream, and the derivation is the same on every
process, platform and Python version (crc32, not Python's salted ``hash``).

``key(root, *path)`` gives a JAX key; ``seed(root, *path)`` a 31-bit integer for numpy, grammar and other host-side
generators; ``rng(root, *path)`` a ``numpy.random.Generator``.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

PathElement = str | int


def _element_id(e: PathElement) -> int:
    if isinstance(e, bool) or not isinstance(e, (str, int)):
        raise TypeError(f"a seed path element must be a str or an int, got {e!r}")
    if isinstance(e, int):
        if not 0 <= e < 2**31:
            raise ValueError(f"a seed path integer must be in [0, 2**31), got {e}")
        return e
    # Strings and integers live in disjoint halves of the 32-bit space, so "3" and 3 name different streams.
    return (zlib.crc32(e.encode()) | 0x8000_0000) & 0xFFFF_FFFF


def key(root: int, *path: PathElement) -> jax.Array:
    """The JAX key of the stream ``path`` under the root seed: fold_in(... fold_in(key(root), id(p0)) ..., id(pk))."""
    k = jax.random.key(int(root))
    for e in path:
        k = jax.random.fold_in(k, _element_id(e))
    return k


def seed(root: int, *path: PathElement) -> int:
    """A 31-bit integer seed of the stream ``path`` (for host-side generators), from the same derivation as ``key``."""
    data = np.asarray(jax.random.key_data(key(root, *path))).ravel()
    return int(zlib.crc32(data.astype(np.uint32).tobytes()) & 0x7FFF_FFFF)


def rng(root: int, *path: PathElement) -> np.random.Generator:
    """A numpy Generator of the stream ``path``."""
    return np.random.default_rng(seed(root, *path))
