"""What the reconciler reads and writes for the outputs (controller/outputs): each output's informer, the
resource it writes, and this process's recent writes over that informer (read-your-writes, one source of truth
per output: a delete already seen there is not sent twice)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from controller.model import OutputWrite
from controller.outputs import OUTPUTS
from controller.outputs.base import Observed
from controller.runtime.writes import RecentWrites
from kubemcsa.client import kube
from kubemcsa.client.informer import Informer


@dataclass
class OutputCache:
    """An output's informer (its Watch) and the resource it writes."""

    informer: Informer
    resource: kube.Resource
    served: bool = True  # False: discovery says the API server does not serve the type (the informer waits)


class OutputStore:
    def __init__(self, caches: dict[str, OutputCache]) -> None:
        self.caches = caches
        self.recent = {name: RecentWrites() for name in caches}

    def seen(self, output: str, obj: dict[str, Any], wake: Callable[[], None], deleted: bool = False) -> None:
        """The output's informer delivered `obj` (or its deletion): `wake()` unless it is this process's own write
        coming back (controller.runtime.writes.RecentWrites.delivered)."""
        if deleted:
            self.recent[output].forget(kube.object_key(obj))
            wake()
            return
        self.recent[output].delivered(kube.object_key(obj), obj, wake)

    def observe(self, namespace: str, name: str) -> dict[str, Observed]:
        """Each output's object for import `name` in `namespace`, as cached or as last written."""
        observed: dict[str, Observed] = {}
        for output in OUTPUTS:
            cache = self.caches.get(output.name)
            if cache is None:
                continue
            if not cache.served:
                problem = "the API server does not serve them"
                observed[output.name] = Observed(available=False, problem=problem, not_served=True)
                continue
            if not cache.informer.has_synced:  # an optional watch that has not listed (yet)
                observed[output.name] = Observed(available=False, **watch_problem(cache.informer))
                continue
            obj_name = output.owns.name_for(name)
            cached = cache.informer.get(obj_name, namespace)
            observed[output.name] = Observed(self.recent[output.name].get((namespace, obj_name), cached))
        return observed

    def write(self, write: OutputWrite, namespace: str) -> bool:
        """Create, replace or delete an output's object; False if the cache was behind (look again soon)."""
        resource = self.caches[write.output].resource
        recent = self.recent[write.output]
        key = kube.object_key(write.body)
        if write.delete:
            meta = write.body.get("metadata") or {}
            preconditions = {"uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")}
            try:
                resource.delete(key[1], namespace, preconditions=preconditions)
            except ApiException as exc:
                if exc.status == 409:  # changed since it was cached: look again with what changed
                    recent.forget(key)
                    return False
                if exc.status != 404:
                    raise
            recent.deleted(key)
            return True
        with recent.writing(key) as wrote:
            try:
                if write.create:
                    written = resource.create(write.body, namespace)
                else:
                    written = resource.replace(write.body, namespace)
                status = write.body.get("status")
                if status is not None and written.get("status") != status:
                    # A status subresource ignores status on create and replace: it is written on its own.
                    written = resource.replace_status({**written, "status": status}, namespace)
            except ApiException as exc:
                if exc.status not in (404, 409):
                    raise
                # The cache was behind (someone created, edited or deleted it meanwhile): look again soon.
                recent.forget(key)
                return False
            wrote(written)
        return True


def watch_problem(informer: Informer) -> dict[str, Any]:
    """Why an informer has not listed: its type is not served (a CRD not installed), or another failure."""
    if informer.last_error == 404:
        return {"problem": "the API server does not serve them", "not_served": True}
    if informer.last_error is None:
        return {"problem": "they are not listed yet"}
    if informer.last_error == 0:
        return {"problem": "the API server did not answer"}
    return {"problem": f"listing them failed with HTTP {informer.last_error}"}
