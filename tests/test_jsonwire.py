"""kubemcsa.jsonwire: the same values as the standard library for every document Kubernetes sends, and a
ValueError (never another exception) for anything else."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kubemcsa import jsonwire

# What Kubernetes' JSON holds: strings (any Unicode but lone surrogates), 64-bit integers, finite floats, booleans,
# null, lists and objects.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"]))
)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(_values, st.booleans())
def test_every_document_kubernetes_sends_reads_as_the_standard_library_reads_it(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert jsonwire.loads(text.encode()) == json.loads(text)
    assert jsonwire.loads(text) == json.loads(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_any_bytes_are_a_value_or_a_value_error(data: bytes) -> None:
    try:
        jsonwire.loads(data)
    except ValueError:
        pass
