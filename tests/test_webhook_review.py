"""AdmissionReview in, AdmissionReview out: versions, uid, patch encoding, real fixtures, bad input."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from kubemcsa.contract import api
from webhook import mutation, review
from webhook.lookups import StaticCache

FIXTURES = Path(__file__).parent / "fixtures"
NS = "capture-demo"
ENABLED = {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}
IMPORTS = {(NS, "cluster2-default-pod-lister"), (NS, "cluster3-default-pod-lister")}


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def answer(document: Any, cache: StaticCache | None = None) -> tuple[review.Answer, dict[str, Any]]:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    result = review.review(body, cache or StaticCache({NS: ENABLED}, IMPORTS))
    return result, json.loads(result.body)


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["response"]["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["response"]["patch"]))


def test_kubectl_pod_fixture_gets_both_imports_in_every_container() -> None:
    document = fixture("admissionreview-v1-pod.json")
    result, response = answer(document)
    assert result.status_code == 200 and result.result == review.RESULT_PATCHED
    assert response["apiVersion"] == "admission.k8s.io/v1" and response["kind"] == "AdmissionReview"
    assert response["response"]["uid"] == document["request"]["uid"]
    assert response["response"]["allowed"] is True
    pod = jsonpatch.apply_patch(document["request"]["object"], patch_of(response))
    assert [v["name"] for v in pod["spec"]["volumes"]] == [
        "scratch",
        "kube-api-access-9bqls",
        "sai-cluster2-default-pod-lister",
        "sai-cluster3-default-pod-lister",
    ]
    assert pod["spec"]["volumes"][2]["secret"] == {"secretName": "cluster2-default-pod-lister-token"}
    for container in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        ours = [m for m in container["volumeMounts"] if m["name"].startswith("sai-")]
        assert ours == [
            {
                "name": "sai-cluster2-default-pod-lister",
                "mountPath": f"{api.MOUNT_ROOT}/cluster2-default-pod-lister",
                "readOnly": True,
            },
            {
                "name": "sai-cluster3-default-pod-lister",
                "mountPath": f"{api.MOUNT_ROOT}/cluster3-default-pod-lister",
                "readOnly": True,
            },
        ]
    # Appends, never replaces: the projected service-account volume and its mounts stay first.
    assert all(op["path"].endswith("/-") for op in patch_of(response))


def test_replicaset_pod_fixture_without_name_uses_the_request_namespace() -> None:
    document = fixture("admissionreview-v1-deployment-pod.json")
    del document["request"]["object"]["metadata"]["namespace"]
    _, response = answer(document)
    pod = jsonpatch.apply_patch(document["request"]["object"], patch_of(response))
    assert pod["spec"]["volumes"][-1] == {
        "name": "sai-cluster2-default-pod-lister",
        "secret": {"secretName": "cluster2-default-pod-lister-token"},
    }


def test_v1beta1_is_answered_in_v1beta1() -> None:
    document = fixture("admissionreview-v1-deployment-pod.json")
    document["apiVersion"] = "admission.k8s.io/v1beta1"
    _, response = answer(document)
    assert response["apiVersion"] == "admission.k8s.io/v1beta1"
    assert response["response"]["uid"] == document["request"]["uid"]


def test_unknown_import_is_a_well_formed_refusal() -> None:
    document = fixture("admissionreview-v1-pod.json")
    result, response = answer(document, StaticCache({NS: ENABLED}, {(NS, "cluster2-default-pod-lister")}))
    assert result.result == review.RESULT_REFUSED and result.reason == mutation.REASON_IMPORT_NOT_FOUND
    assert response["response"]["allowed"] is False
    status = response["response"]["status"]
    assert status["code"] == 403
    assert '"cluster3-default-pod-lister"' in status["message"] and NS in status["message"]


def test_namespace_not_enabled_is_allowed_untouched() -> None:
    result, response = answer(fixture("admissionreview-v1-pod.json"), StaticCache({NS: {}}, IMPORTS))
    assert result.result == review.RESULT_ALLOWED
    assert response["response"] == {"uid": "83de7db1-d96e-44ff-949e-7cf7d41823e5", "allowed": True}


@pytest.mark.parametrize("operation", ["UPDATE", "DELETE", "CONNECT", None])
def test_other_operations_are_allowed(operation: str | None) -> None:
    document = fixture("admissionreview-v1-pod.json")
    document["request"]["operation"] = operation
    result, response = answer(document)
    assert result.result == review.RESULT_ALLOWED and response["response"]["allowed"] is True


def test_lookup_failure_is_a_refusal_that_says_to_retry() -> None:
    class Unreachable(StaticCache):
        def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
            raise mutation.LookupFailed("could not look up; retry")

    result, response = answer(fixture("admissionreview-v1-pod.json"), Unreachable({NS: ENABLED}))
    assert result.reason == mutation.REASON_LOOKUP_FAILED
    assert response["response"]["status"] == {
        "code": 503,
        "reason": "ServiceUnavailable",
        "message": "could not look up; retry",
    }


def test_a_bug_in_the_lookup_is_a_refusal_not_an_exception() -> None:
    class Buggy(StaticCache):
        def namespace_labels(self, namespace: str) -> None:
            raise KeyError("bug")

    result, response = answer(fixture("admissionreview-v1-pod.json"), Buggy())
    assert result.result == review.RESULT_ERROR
    assert response["response"]["allowed"] is False and response["response"]["status"]["code"] == 500


def test_would_block_is_passed_to_the_caller() -> None:
    class CacheOnly(StaticCache):
        def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
            raise mutation.LookupWouldBlock(namespace)

    with pytest.raises(mutation.LookupWouldBlock):
        answer(fixture("admissionreview-v1-pod.json"), CacheOnly({NS: ENABLED}))


def _with(path: list[str], value: Any) -> dict[str, Any]:
    document = copy.deepcopy(fixture("admissionreview-v1-pod.json"))
    target = document
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return document


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"1" * 5000, "not JSON"),
        # What the standard library would accept but Kubernetes never sends (kubemcsa.jsonwire refuses it).
        (b"[" * 2000 + b"]" * 2000, "not JSON"),
        (json.dumps({"kind": "AdmissionReview", "request": {"uid": float("nan")}}).encode(), "not JSON"),
        (b'{"kind": "AdmissionReview", "request": {"uid": "\\ud800"}}', "not JSON"),
        (b"[]", "not a JSON object"),
        (b"{}", "not an AdmissionReview"),
        (json.dumps({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v2"}).encode(), "AdmissionReview"),
        (_with(["request"], ...), "no request"),
        (_with(["request"], None), "no request"),
        (_with(["request", "uid"], ...), "no uid"),
        (_with(["request", "uid"], ""), "no uid"),
        (_with(["request", "uid"], 7), "no uid"),
        (b" " * (review.MAX_BODY_BYTES + 1), "larger than"),
    ],
)
def test_bad_requests_get_a_400_status(body: Any, fragment: str) -> None:
    result, status = answer(body)
    assert result.status_code == 400 and result.result == review.RESULT_BAD_REQUEST
    assert status["kind"] == "Status" and status["code"] == 400
    assert fragment in status["message"]


@pytest.mark.parametrize(
    "document",
    [
        _with(["request", "object"], None),
        _with(["request", "object"], "pod"),
        _with(["request", "object", "kind"], "Deployment"),
        _with(["request", "kind"], {"group": "apps", "version": "v1", "kind": "Deployment"}),
        _with(["request", "kind"], "Pod"),
    ],
)
def test_objects_that_are_not_pods_are_refused_with_the_uid(document: dict[str, Any]) -> None:
    result, response = answer(document)
    assert result.status_code == 200 and result.reason == review.REASON_NOT_A_POD
    assert response["response"]["uid"] == document["request"]["uid"]
    assert response["response"]["allowed"] is False
    assert "only admits core/v1 pods" in response["response"]["status"]["message"]


def test_subresources_are_not_judged() -> None:
    document = _with(["request", "subResource"], "binding")
    result, _ = answer(document)
    assert result.result == review.RESULT_ALLOWED


def _pod_review(annotation: str, **spec: Any) -> bytes:
    document = fixture("admissionreview-v1-pod.json")
    document["request"]["object"]["metadata"]["annotations"][api.IMPORT_ANNOTATION] = annotation
    document["request"]["object"]["spec"].update(spec)
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    "body",
    [
        _pod_review("cluster2-default-pod-lister,cluster3-default-pod-lister"),
        _pod_review("cluster2-default-pod-lister,unknown"),
        _pod_review(",".join(f"n{i}" for i in range(80_000))),
        _pod_review("UPPER," + "x" * 100_000),
        _pod_review("cluster2-default-pod-lister", volumes=[{"name": "sai-cluster2-default-pod-lister"}]),
        _pod_review("cluster2-default-pod-lister", containers=[{"name": f"c{i}"} for i in range(300)]),
        b"{}",
    ],
)
def test_parsing_elsewhere_gives_the_same_answer(body: bytes) -> None:
    # What a worker process sends back (pickled) completes to the answer that reviewing in place gives.
    import pickle

    cache = StaticCache({NS: ENABLED}, IMPORTS)
    parsed = pickle.loads(pickle.dumps(review.parse(body)))
    elsewhere = parsed if isinstance(parsed, review.Answer) else review.complete(parsed, cache)
    assert elsewhere == review.review(body, cache)
    assert len(pickle.dumps(parsed)) < 64 * 1024 or b"patch" in elsewhere.body


def test_small_bodies_that_need_many_mounts_are_sent_elsewhere() -> None:
    body = _pod_review("cluster2-default-pod-lister", containers=[{"name": f"c{i}"} for i in range(200)])
    assert isinstance(review.parse(body, max_mounts=300), review.Pending)
    with pytest.raises(mutation.TooMuchWork):
        review.parse(body, max_mounts=100)


def test_bodies_over_the_cap_are_refused_unread() -> None:
    assert review.MAX_BODY_BYTES >= 3 * 1024 * 1024 + 64 * 1024
    result, response = answer(b" " * (review.MAX_BODY_BYTES + 1))
    assert result.status_code == 400 and "larger than" in response["message"]
