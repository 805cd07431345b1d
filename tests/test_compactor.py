"""kubemcsa.client.informer.Compactor: what every informer keeps is the object it was given, only smaller."""

from __future__ import annotations

import copy
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kubemcsa.client.informer import Compactor

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.text(max_size=12), json_values, max_size=6), managed=st.booleans())
def test_a_compacted_object_equals_the_object_without_managed_fields(body, managed):
    metadata = {"name": "x", "uid": "u", **({"managedFields": [{"manager": "kubectl"}]} if managed else {})}
    obj = {**body, "metadata": metadata}
    expected = copy.deepcopy(obj)
    expected["metadata"].pop("managedFields", None)
    assert Compactor()(json.loads(json.dumps(obj))) == expected


def test_repeated_text_is_kept_once_and_an_objects_own_values_are_not_interned():
    compact = Compactor()
    first, second = (
        compact(json.loads(json.dumps({"metadata": {"namespace": "team-a", "uid": f"uid-{n}"}, "ca": "C" * 5000})))
        for n in range(2)
    )
    assert first["metadata"]["namespace"] is second["metadata"]["namespace"]
    assert first["ca"] is second["ca"]  # long, but repeated: one copy in a bounded table
    lone = json.loads('{"metadata": {"uid": "a-uid-of-its-own-xyz"}}')
    assert compact(lone)["metadata"]["uid"] is lone["metadata"]["uid"]  # as decoded, not entered in the table
