"""The objects an import keeps besides its own Secret ("outputs"), one module each on controller/outputs/base.py.

A new output is a module with an `OUTPUT` (what it owns and watches, how it parses its spec section, what it
wants), its spec section in the CRD, and one line here; the reconciler, assess/plan and the wiring iterate this
registry and do not change.
"""

from __future__ import annotations

from controller.outputs import argocd, clusterprofile
from controller.outputs.base import Output

OUTPUTS: tuple[Output, ...] = (argocd.OUTPUT, clusterprofile.OUTPUT)
