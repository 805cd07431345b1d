"""Record core/v1 Events on objects, as client-go's EventRecorder (one create per Event; failures only logged)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa.client import kube
from kubemcsa.contract.timefmt import format_time

log = logging.getLogger(__name__)


class EventRecorder:
    def __init__(
        self, api_client: ApiClient, component: str, instance: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._events = kube.Resource(api_client, kube.EVENTS)
        self.component = component
        self.instance = instance
        self._clock = clock

    def record(self, obj: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        """An Event of `event_type` (Normal or Warning) on `obj`; the message must hold no secret."""
        meta = obj.get("metadata") or {}
        stamp = format_time(self._clock())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}", "namespace": meta.get("namespace")},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message,
            "type": event_type,
            "source": {"component": self.component},
            "reportingComponent": self.component,
            "reportingInstance": self.instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self._events.create(event, meta.get("namespace"))
        except (ApiException, *kube.CONNECTION_ERRORS) as exc:
            log.info("could not record event %s on %s: %s", reason, meta.get("name"), type(exc).__name__)
