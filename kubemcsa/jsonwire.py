"""How every part reads and writes JSON on the wire: orjson, which parses a pod's AdmissionReview or a watch
event in a third of the standard library's time (the largest single cost of an admission answer, and of the
controller's watches) and writes a request body in a tenth.

It is stricter than the standard library where Kubernetes never goes: NaN, Infinity and lone surrogates are
refused, and nesting deeper than 1024 is refused as bad JSON rather than as a RecursionError. A failure to read is
a ValueError, to write a TypeError. Hashes of what was written are not made from this output (see
kubemcsa.contract.imports.inputs_hash): their encoding must never change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

# The value of one JSON document (bytes, bytearray, memoryview or str); raises ValueError if it is not one.
loads: Callable[[bytes | bytearray | memoryview | str], Any] = orjson.loads

# Compact UTF-8 JSON of a value (str keys only), as json.dumps(value, separators=(",", ":"), ensure_ascii=False)
# writes it, encoded.
dumps: Callable[[Any], bytes] = orjson.dumps
