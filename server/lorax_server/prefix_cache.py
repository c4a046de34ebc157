"""Prefix caching's block keys: a hash chain over a prompt's full KV cache blocks.

Block i's key digests block i-1's key, the identity of the adapter the prompt runs with, and block i's
token ids, so equal keys mean equal tokens at equal positions under the same weights: the cached
keys and values are exactly what computing them again would give. Another adapter (or the base model)
never matches. The digest is cryptographic (BLAKE2b, 128 bits), so a collision, which would silently
serve another prompt's keys, is not a practical concern.
"""

from __future__ import annotations

import hashlib
from array import array

DIGEST_BYTES = 16


def block_hashes(adapter_identity: object, token_ids: list[int], block_size: int, num_blocks: int) -> list[bytes]:
    """The keys of the first `num_blocks` full blocks of `token_ids` (fewer when the prompt is shorter)."""
    num_blocks = min(num_blocks, len(token_ids) // block_size)
    parent = hashlib.blake2b(repr(adapter_identity).encode(), digest_size=DIGEST_BYTES).digest()
    keys = []
    for i in range(num_blocks):
        h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES)
        h.update(array("q", token_ids[i * block_size : (i + 1) * block_size]).tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys
