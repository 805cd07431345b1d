"""How every part reads JSON off the wire: orjson, which parses a pod's AdmissionReview or a watch event in a
third of the standard library's time (the largest single cost of an admission answer, and of the controller's
watches).

It is stricter than `json.loads` where Kubernetes never goes: NaN, Infinity and lone surrogates are refused, and
nesting deeper than 1024 is refused as bad JSON rather than as a RecursionError. Every failure is a ValueError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

# The value of one JSON document (bytes, bytearray, memoryview or str); raises ValueError if it is not one.
loads: Callable[[bytes | bytearray | memoryview | str], Any] = orjson.loads
