"""Raw ids → what the lake stores and what the model indexes, without Spark.

- :func:`user_key`: a raw user id → the key the derived tables hold (the id,
  or its pseudonym with ``privacy.pseudonymize``), for the server and the CLI.
  The MLflow model carries no secret: with pseudonyms its callers pass the
  pseudonym as ``user_id``.
- :func:`bucket`: the same ``pmod(xxhash64(salt + id), buckets)`` that
  ``features.examples.bucket`` computes in Spark (Spark's xxhash64 is XXH64
  with seed 42 over the UTF-8 bytes), so a server or an MLflow model can hash
  an id it has never seen without a JVM. Pure Python: about 5 µs per short id,
  which is fine for a request or a catalogue of thousands of items.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config

SPARK_SEED = 42
_M = (1 << 64) - 1
P1, P2, P3, P4, P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)


def user_key(raw_user_id: str, cfg: "Config | None" = None) -> str:
    """The key the recommendations / user_state tables hold for ``raw_user_id``:
    the id itself, or with ``privacy.pseudonymize`` its pseudonym (the secret
    from the environment or a file, never the config; privacy/keys.py). The
    server and ``deltarec recommend --user`` call this, and hash the key (not
    the raw id) into the model's user row."""
    if cfg is None or not cfg.privacy.pseudonymize:
        return raw_user_id
    from ..privacy.keys import pseudonym, require_secret

    return pseudonym(require_secret(cfg), raw_user_id)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * P2) & _M, 31) * P1) & _M


def xxhash64(data: bytes, seed: int = SPARK_SEED) -> int:
    """XXH64 of ``data`` as a signed 64-bit integer (Spark's ``xxhash64``)."""
    n, p = len(data), 0
    if n >= 32:
        v = [(seed + P1 + P2) & _M, (seed + P2) & _M, seed & _M, (seed - P1) & _M]
        while p <= n - 32:
            lanes = struct.unpack_from("<4Q", data, p)
            v = [_round(a, b) for a, b in zip(v, lanes)]
            p += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
        for a in v:
            h = ((h ^ _round(0, a)) * P1 + P4) & _M
    else:
        h = (seed + P5) & _M
    h = (h + n) & _M
    while p + 8 <= n:
        h = (_rotl(h ^ _round(0, struct.unpack_from("<Q", data, p)[0]), 27) * P1 + P4) & _M
        p += 8
    if p + 4 <= n:
        h = (_rotl(h ^ ((struct.unpack_from("<I", data, p)[0] * P1) & _M), 23) * P2 + P3) & _M
        p += 4
    while p < n:
        h = (_rotl(h ^ ((data[p] * P5) & _M), 11) * P1) & _M
        p += 1
    h ^= h >> 33
    h = (h * P2) & _M
    h ^= h >> 29
    h = (h * P3) & _M
    h ^= h >> 32
    return h - (1 << 64) if h >> 63 else h


def bucket(value: str, buckets: int, salt: str = "") -> int:
    """Row of ``value`` among ``buckets``: Spark's ``pmod(xxhash64(salt || value), buckets)``."""
    return xxhash64((salt + value).encode("utf-8")) % buckets
