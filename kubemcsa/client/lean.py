"""The lean request path: plain JSON over the official client's own urllib3 pool, for the calls the controller makes per
import (no model serialization, no per-request proxy lookup), with the official client's errors and configuration.
"""

from __future__ import annotations

import functools
import json
from typing import Any
from urllib.parse import quote, urlencode

import urllib3
from kubernetes.client import ApiClient, rest
from kubernetes.client.exceptions import ApiException

PATCH_CONTENT_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}


@functools.lru_cache(maxsize=64)  # a Timeout is cloned by urllib3 for each request: one per value will do
def _timeout(value: float | tuple[float, float] | None) -> urllib3.Timeout | None:
    if not value:
        return None
    if isinstance(value, tuple):
        return urllib3.Timeout(connect=value[0], read=value[1])
    return urllib3.Timeout(total=value)


@functools.lru_cache(maxsize=256)
def _parsed_host(host: str) -> tuple[str, str | None, str | None, int | None]:
    """(path prefix, scheme, host name, port) of a configuration's host URL, as the PoolManager would parse it."""
    parsed = urllib3.util.parse_url(host)
    return (parsed.path or "").rstrip("/"), parsed.scheme, parsed.host, parsed.port


def lean_request(
    api_client: ApiClient,
    method: str,
    path: str,
    *,
    query: list[tuple[str, Any]] | None = None,
    body: Any = None,
    content_type: str = "application/json",
    timeout: float | tuple[float, float] | None = None,
) -> rest.RESTResponse:
    """`method path` with a JSON body over `api_client`'s pool, with its auth and default headers (see Resource)."""
    configuration = api_client.configuration
    headers = {**api_client.default_headers, "Accept": "application/json", "Content-Type": content_type}
    if api_client.cookie:
        headers["Cookie"] = api_client.cookie
    bearer = configuration.auth_settings().get("BearerToken")  # runs the refresh hook: a rotated token is read
    if bearer and bearer.get("value"):
        headers[bearer["key"]] = bearer["value"]
    url = configuration.host + path
    pairs = [(k, v) for k, v in (query or []) if v is not None]
    if pairs:
        url += "?" + urlencode(pairs, quote_via=quote)
    if content_type == PATCH_CONTENT_TYPES["json"] and not isinstance(body, list):
        headers["Content-Type"] = PATCH_CONTENT_TYPES["strategic"]  # as the REST client does for such a body
    payload = None if body is None or method in ("GET", "HEAD") else json.dumps(body, separators=(",", ":"))
    pool_manager = api_client.rest_client.pool_manager
    try:
        if type(pool_manager) is urllib3.PoolManager:
            # Straight to the host's connection pool: the PoolManager's own layer parses the URL again and
            # handles redirects, which the API server does not send. A proxy's manager goes the full way.
            prefix, scheme, host, port = _parsed_host(configuration.host)
            pool = pool_manager.connection_from_host(host, port=port, scheme=scheme)
            response = pool.urlopen(
                method,
                prefix + url[len(configuration.host) :],
                body=payload,
                headers=headers,
                timeout=_timeout(timeout),
                preload_content=False,
                redirect=False,
                assert_same_host=False,
            )
        else:
            response = pool_manager.request(
                method, url, body=payload, headers=headers, timeout=_timeout(timeout), preload_content=False
            )
    except urllib3.exceptions.SSLError as exc:  # as the REST client reports it: an ApiException without a status
        raise ApiException(status=0, reason="\n".join([type(exc).__name__, str(exc)])) from exc
    return rest.RESTResponse(response)
