"""The HTTP app in-process: endpoints, metrics, readiness, and a fuzz of malformed and adversarial reviews."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubemcsa.contract import api
from webhook import review
from webhook.app import MUTATE_PATH, create_app
from webhook.lookups import StaticCache
from webhook.mutation import LookupWouldBlock

FIXTURES = Path(__file__).parent / "fixtures"
NS = "capture-demo"
ENABLED = {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}
IMPORTS = {(NS, "cluster2-default-pod-lister"), (NS, "cluster3-default-pod-lister")}
POD_REVIEW = json.loads((FIXTURES / "admissionreview-v1-pod.json").read_text())
DEPLOYMENT_POD_REVIEW = json.loads((FIXTURES / "admissionreview-v1-deployment-pod.json").read_text())


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(StaticCache({NS: ENABLED}, IMPORTS)), raise_server_exceptions=True) as c:
        yield c


def test_mutate_answers_the_fixture(client: TestClient) -> None:
    response = client.post(MUTATE_PATH, content=json.dumps(POD_REVIEW))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["response"]["uid"] == POD_REVIEW["request"]["uid"]
    assert body["response"]["patchType"] == "JSONPatch"


def test_health_and_readiness() -> None:
    cache = StaticCache(synced=False)
    tls = {"loaded": False}
    with TestClient(create_app(cache, tls_ready=lambda: tls["loaded"])) as c:
        assert c.get("/healthz").status_code == 200
        not_ready = c.get("/readyz")
        assert not_ready.status_code == 503
        assert "not synced" in not_ready.text and "certificate" in not_ready.text
        cache.synced = True
        assert c.get("/readyz").status_code == 503
        tls["loaded"] = True
        assert c.get("/readyz").status_code == 200


def test_metrics_count_results_refusals_latency_and_misses() -> None:
    class MissingOnce(StaticCache):
        """A cache whose dict view always misses, so the review goes through the thread pool."""

        def __init__(self) -> None:
            super().__init__({NS: ENABLED}, {(NS, "cluster2-default-pod-lister")})
            self.blocking_calls = 0

        def cached(self) -> Any:
            outer = self

            class View:
                def namespace_labels(self, namespace: str) -> Any:
                    return outer.namespaces.get(namespace)

                def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
                    raise LookupWouldBlock(namespace)

            return View()

        def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
            self.blocking_calls += 1
            return super().missing_imports(namespace, names)

        def misses(self) -> dict[str, int]:
            return {"import": self.blocking_calls, "namespace": 0}

    cache = MissingOnce()
    with TestClient(create_app(cache)) as c:
        refused = c.post(MUTATE_PATH, content=json.dumps(POD_REVIEW)).json()
        assert refused["response"]["allowed"] is False
        assert c.post(MUTATE_PATH, content=b"nope").status_code == 400
        text = c.get("/metrics").text
    assert 'kubemcsa_webhook_requests_total{result="refused"} 1.0' in text
    assert 'kubemcsa_webhook_requests_total{result="bad_request"} 1.0' in text
    assert 'kubemcsa_webhook_refusals_total{reason="ImportNotFound"} 1.0' in text
    assert 'kubemcsa_webhook_cache_misses_total{kind="import"} 1.0' in text
    assert "kubemcsa_webhook_request_duration_seconds_count 2.0" in text


def test_oversized_body_is_a_400_without_reading_it_all(client: TestClient) -> None:
    response = client.post(MUTATE_PATH, content=b"{" + b" " * (review.MAX_BODY_BYTES + 10) + b"}")
    assert response.status_code == 400
    assert "larger than" in response.json()["message"]

    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            yield b" " * (1024 * 1024)

    streamed = client.post(MUTATE_PATH, content=chunks())
    assert streamed.status_code == 400


# Fuzz: valid-looking reviews with any subtree replaced by arbitrary JSON, plus raw garbage.
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
_interesting = st.sampled_from(
    [
        "",
        "Pod",
        "CREATE",
        "admission.k8s.io/v1",
        "admission.k8s.io/v1beta1",
        "cluster2-default-pod-lister, ,cluster2-default-pod-lister",
        "sai-cluster2-default-pod-lister",
        f"{api.MOUNT_ROOT}/cluster2-default-pod-lister",
        "\ud800",
        "a" * 300,
        [],
        {},
        None,
        -1,
        10**30,
    ]
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


_TEMPLATES = [POD_REVIEW, DEPLOYMENT_POD_REVIEW]
_TEMPLATE_PATHS = [[p for p in _paths(t) if p and "managedFields" not in p] for t in _TEMPLATES]


@st.composite
def adversarial_reviews(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.binary(max_size=200))
    if choice == 1:
        return json.dumps(draw(_json)).encode()
    index = draw(st.integers(0, 1))
    document = copy.deepcopy(_TEMPLATES[index])
    if draw(st.booleans()):
        document["apiVersion"] = "admission.k8s.io/v1beta1"
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_TEMPLATE_PATHS[index]))
        target: Any = document
        try:
            for key in path[:-1]:
                target = target[key]
            value = copy.deepcopy(draw(_interesting | _json))  # sampled values are shared objects
            if draw(st.integers(0, 4)) == 0 and isinstance(target, dict):
                target.pop(path[-1], None)
            else:
                target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    return json.dumps(document).encode()


def check_answer(body: bytes, status_code: int, answer: bytes) -> None:
    assert status_code in (200, 400), status_code
    document = json.loads(answer)
    if status_code == 400:
        assert document["kind"] == "Status" and document["code"] == 400 and document["message"]
        return
    request = json.loads(body)
    assert document["apiVersion"] == request["apiVersion"]
    assert document["kind"] == "AdmissionReview"
    response = document["response"]
    assert response["uid"] == request["request"]["uid"]
    assert isinstance(response["allowed"], bool)
    if not response["allowed"]:
        assert response["status"]["message"] and response["status"]["code"] in (400, 403, 500, 503)
        assert "patch" not in response
    elif "patch" in response:
        assert response["patchType"] == "JSONPatch"
        patch = json.loads(base64.b64decode(response["patch"], validate=True))
        jsonpatch.apply_patch(request["request"]["object"], patch)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(adversarial_reviews())
def test_fuzz_review_always_answers_validly(body: bytes) -> None:
    answer = review.review(body, StaticCache({NS: ENABLED}, IMPORTS))
    assert answer.result != review.RESULT_ERROR, "an unexpected exception was turned into a refusal"
    check_answer(body, answer.status_code, answer.body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=adversarial_reviews())
def test_fuzz_through_http_never_500s(client: TestClient, body: bytes) -> None:
    response = client.post(MUTATE_PATH, content=body)
    check_answer(body, response.status_code, response.content)


def test_client_gone_mid_body_gets_no_answer_and_no_count() -> None:
    import asyncio

    app = create_app(StaticCache())
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": MUTATE_PATH, "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    assert sent == []
    samples = {s.name: s.value for s in app.state.metrics.latency.collect()[0].samples}
    assert samples["kubemcsa_webhook_request_duration_seconds_count"] == 0


def _review_with(annotation: str, **spec: Any) -> bytes:
    document = copy.deepcopy(POD_REVIEW)
    document["request"]["object"]["metadata"]["annotations"][api.IMPORT_ANNOTATION] = annotation
    document["request"]["object"]["spec"].update(spec)
    return json.dumps(document).encode()


def test_attack_bodies_get_prompt_well_formed_answers_and_health_keeps_answering() -> None:
    from webhook import app as webhook_app
    from webhook.mutation import REASON_TOO_MANY_IMPORTS

    eighty_thousand = _review_with(",".join(f"name-{i}" for i in range(80_000)))
    env = [{"name": "x"}] * 210_000
    three_megabytes = _review_with("cluster2-default-pod-lister", containers=[{"name": "c", "env": env}])
    assert len(eighty_thousand) > webhook_app.INLINE_BODY_BYTES and len(three_megabytes) > 3_000_000
    many_mounts = _review_with("cluster2-default-pod-lister", containers=[{"name": f"c{i}"} for i in range(250)])
    app = create_app(StaticCache({NS: ENABLED}, IMPORTS))
    with TestClient(app) as c:
        assert c.post(MUTATE_PATH, content=json.dumps(POD_REVIEW)).json()["response"]["allowed"] is True
        assert app.state.parser._pool is None  # the usual request is answered on the event loop
        refused = c.post(MUTATE_PATH, content=eighty_thousand)
        assert app.state.parser._pool is not None  # a large one was parsed in the worker process
        check_answer(eighty_thousand, refused.status_code, refused.content)
        assert REASON_TOO_MANY_IMPORTS not in refused.text  # the reason is a metric label; the message says it
        assert f"more than {api.MAX_IMPORTS_PER_POD} imports" in refused.json()["response"]["status"]["message"]
        assert c.get("/healthz").status_code == 200
        patched = c.post(MUTATE_PATH, content=three_megabytes)
        check_answer(three_megabytes, patched.status_code, patched.content)
        assert patched.json()["response"]["allowed"] is True
        assert c.post(MUTATE_PATH, content=many_mounts).json()["response"]["allowed"] is True
        too_large = c.post(MUTATE_PATH, content=b" " * (review.MAX_BODY_BYTES + 1))
        assert too_large.status_code == 400 and "larger than" in too_large.json()["message"]
        text = c.get("/metrics").text
    assert 'kubemcsa_webhook_refusals_total{reason="TooManyImports"} 1.0' in text
    app.state.parser.close()


def test_request_timeout_comes_from_the_query() -> None:
    from webhook.app import DEFAULT_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS, request_timeout

    assert request_timeout(b"timeout=5s") == 5
    assert request_timeout(b"a=b&timeout=7s") == 7
    assert request_timeout(b"") == DEFAULT_TIMEOUT_SECONDS
    assert request_timeout(b"timeout=999s") == MAX_TIMEOUT_SECONDS
    assert request_timeout(b"timeout=0s") == 1
    assert request_timeout(b"timeout=5m") == DEFAULT_TIMEOUT_SECONDS


def test_a_body_that_does_not_come_is_answered_by_the_callers_deadline() -> None:
    import asyncio

    app = create_app(StaticCache())
    sent: list[dict[str, Any]] = []
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"{", "more_body": True}
        await asyncio.Event().wait()  # the rest never comes
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": MUTATE_PATH, "headers": [], "query_string": b"timeout=1s"}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    assert sent[0]["status"] == 400
    assert "did not arrive within the request's timeout" in json.loads(sent[1]["body"])["message"]


def test_a_dead_parsing_process_is_replaced() -> None:
    import os
    import signal

    large = _review_with(",".join(f"name-{i}" for i in range(5_000)))
    app = create_app(StaticCache({NS: ENABLED}, IMPORTS))
    try:
        with TestClient(app) as c:
            assert c.post(MUTATE_PATH, content=large).json()["response"]["allowed"] is False
            pool = app.state.parser._pool
            for pid in list(pool._processes):
                os.kill(pid, signal.SIGKILL)
            answers = [c.post(MUTATE_PATH, content=large) for _ in range(3)]
            # The request that finds the process dead may be refused (retry); the next ones are answered again.
            assert answers[-1].status_code == 200 and answers[-1].json()["response"]["allowed"] is False
            assert app.state.parser._pool is not pool
    finally:
        app.state.parser.close()
