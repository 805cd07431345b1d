"""Each output's watch (controller/outputs), declared by the output and run here: an informer over the type it owns,
whose events wake the import an object belongs to.

An optional watch (a CRD that may not be installed) does not hold the workers back, and starts only once discovery
says its type is served: asked at start, then at most once every `recheck_seconds` while an import asks for that
output, so that a cluster without the CRD sees no other call for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller.outputs import OUTPUTS
from controller.outputs.base import Output, as_section
from controller.outputs.store import OutputCache
from kubemcsa.client import kube
from kubemcsa.client.informer import EventHandler, Informer

log = logging.getLogger(__name__)


ASKS_FOR = "asks-for-output"  # the imports informer's index: output name -> the imports that ask for it


def _outputs_asked(imp: dict[str, Any]) -> list[str]:
    return [
        output.name for output in OUTPUTS if output.watch.optional and as_section(imp, output.spec_field) is not None
    ]


class OutputWatches:
    def __init__(
        self,
        local_client: ApiClient,
        *,
        namespace: str | None,
        add_informer: Callable[..., Informer],
        recheck_seconds: float,
        timeout: float,
        clock: Callable[[], float],
    ) -> None:
        self.local_client = local_client
        self.add_informer = add_informer
        self.recheck_seconds = recheck_seconds
        self.timeout = timeout
        self.clock = clock
        self.caches: dict[str, OutputCache] = {}
        for output in OUTPUTS:
            owned = kube.ResourceType(output.owns.api_version, output.owns.plural, output.owns.kind)
            resource = kube.Resource(local_client, owned)
            informer = Informer(
                resource, namespace=namespace, label_selector=output.watch.label_selector, name=output.watch.name
            )
            if not output.watch.optional:
                add_informer(informer)
            self.caches[output.name] = OutputCache(informer, resource)
        self._checked_at: dict[str, float] = {}
        self._listed: set[str] = set()

    def route(
        self,
        imports: Informer,
        seen: Callable[[str, dict[str, Any], Callable[[], None], bool], None],
        wake: Callable[[str, str], None],
    ) -> None:
        """Each output's events go to `seen`, with the wake-up of the import they concern (`wake(namespace,
        name)`) for it to give unless the event is the controller's own write. Call before `imports` starts (it
        gains an index)."""
        self._imports, self._wake = imports, wake
        # Which imports ask for an optional output, without a scan of every import on each poll.
        imports.add_index(ASKS_FOR, _outputs_asked)
        for output in OUTPUTS:
            self.caches[output.name].informer.add_handler(self._handler(output, seen))

    def start_optional(self) -> None:
        """Start the optional watches whose type is served (after the manager started the required ones)."""
        for output in OUTPUTS:
            if output.watch.optional:
                self._start_if_served(output)

    def _handler(
        self, output: Output, seen: Callable[[str, dict[str, Any], Callable[[], None], bool], None]
    ) -> EventHandler:
        def on_event(event: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
            """An output's object changed (a foreign one of a name an import uses, or ours by another hand): that
            import looks again. The echo of the controller's own write wakes nobody: the pass that wrote it knew."""
            namespace, _ = kube.object_key(obj)
            import_name = output.watch.import_for(obj)

            def wake() -> None:
                if import_name and self._imports.get(import_name, namespace) is not None:
                    self._wake(namespace, import_name)

            seen(output.name, obj, wake, event == "DELETED")

        return on_event

    def poll(self) -> None:
        """An optional watch whose type is not served yet: look again (at most every recheck_seconds) while an import
        asks for that output; once it lists, those imports look again (they said why it was off, and an empty list
        has no events to say it is on)."""
        for output in OUTPUTS:
            cache = self.caches[output.name]
            if not output.watch.optional or output.name in self._listed:
                continue
            asking = self._imports.by_index(ASKS_FOR, output.name)
            checked = self._checked_at.get(output.name, 0.0)
            if not cache.served and asking and self.clock() >= checked + self.recheck_seconds:
                self._start_if_served(output)
            if cache.informer.has_synced:
                self._listed.add(output.name)
                for imp in asking:
                    self._wake(*kube.object_key(imp))

    def _start_if_served(self, output: Output) -> None:
        """Start an optional output's informer if discovery lists its type (a failed look counts as served: the
        informer then says what is wrong)."""
        cache = self.caches[output.name]
        self._checked_at[output.name] = self.clock()
        path = kube.ResourceType(output.owns.api_version, output.owns.plural, output.owns.kind).path()
        try:
            listing = kube.get_path(self.local_client, path.rsplit("/", 1)[0], timeout=self.timeout)
            cache.served = any(r.get("name") == output.owns.plural for r in listing.get("resources") or [])
        except ApiException as exc:
            cache.served = exc.status != 404
        except kube.CONNECTION_ERRORS:
            cache.served = True
        if cache.served:
            self.add_informer(cache.informer, required=False)
            cache.informer.start()
        else:
            log.info("%s are not served here: the %s output is off until they are", output.owns.plural, output.name)
