"""Garbage-collection decisions (pure): what to do with a dependent given which of its owners still exist."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

KEEP = "keep"
DELETE = "delete"
DROP_REFS = "drop-refs"


def decide(refs: Sequence[dict[str, Any]], alive: Sequence[dict[str, Any]]) -> str:
    """KEEP if every owner exists; DELETE if none does (kube's background GC); else DROP_REFS to the gone ones.

    An object without ownerReferences is never collected.
    """
    if not refs or len(alive) == len(refs):
        return KEEP
    if not alive:
        return DELETE
    return DROP_REFS
