"""Service-account tokens of the in-memory API server: TokenRequest, legacy tokens, authentication, TokenReview."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemcsa_testing.errors import StatusError
from kubemcsa_testing.tokens import TokenAuthority, TokenClaims, decode_unverified, user_for_claims

ISSUER = "https://cluster1.local"
NOW = 1_795_381_143.0
SA = {"metadata": {"name": "demo", "namespace": "default", "uid": "uid-1"}}


@pytest.fixture(scope="module")
def authority() -> TokenAuthority:
    return TokenAuthority(ISSUER)


@pytest.fixture(scope="module")
def other_authority() -> TokenAuthority:
    return TokenAuthority(ISSUER)


def request_token(authority: TokenAuthority, spec: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    body = None if spec is None else {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    kw.setdefault("now", NOW)
    return authority.token_request(body, namespace="default", service_account=SA, **kw)


def b64url_json(part: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def lookups(sa: dict[str, Any] | None = SA, secret: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "lookup_service_account": lambda ns, name: sa if (ns, name) == ("default", "demo") else None,
        "lookup_secret": lambda ns, name: secret,
    }


def test_token_request_answers_like_kube_apiserver(authority: TokenAuthority) -> None:
    answer = request_token(authority, {"expirationSeconds": 3600, "audiences": ["foo"]})
    assert answer["kind"] == "TokenRequest" and answer["apiVersion"] == "authentication.k8s.io/v1"
    assert answer["spec"] == {"audiences": ["foo"], "expirationSeconds": 3600, "boundObjectRef": None}
    assert answer["status"]["expirationTimestamp"] == "2026-11-22T21:59:03Z"
    header_part, payload_part, _ = answer["status"]["token"].split(".")
    assert b64url_json(header_part) == {"alg": "RS256", "kid": authority.key_id}
    claims = b64url_json(payload_part)
    assert uuid.UUID(claims.pop("jti"))  # a unique ID per token, as kube-apiserver 1.29+ (seen on 1.36)
    assert claims == {
        "aud": ["foo"],
        "exp": 1795384743,
        "iat": 1795381143,
        "iss": ISSUER,
        "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "demo", "uid": "uid-1"}},
        "nbf": 1795381143,
        "sub": "system:serviceaccount:default:demo",
    }


def test_empty_spec_defaults_to_api_audiences_and_an_hour(authority: TokenAuthority) -> None:
    for answer in (request_token(authority), request_token(authority, {})):
        assert answer["spec"]["audiences"] == [ISSUER]
        assert answer["spec"]["expirationSeconds"] == 3600
        assert decode_unverified(answer["status"]["token"])["aud"] == [ISSUER]
    custom = TokenAuthority("https://c2", api_audiences=["api", "other"], key_size=1024)
    assert custom.token_request({}, namespace="default", service_account=SA)["spec"]["audiences"] == ["api", "other"]


def test_short_expiration_is_refused_with_kube_s_status(authority: TokenAuthority) -> None:
    with pytest.raises(StatusError) as caught:
        request_token(authority, {"expirationSeconds": 500})
    status = caught.value.to_status()
    assert status["code"] == 422 and status["reason"] == "Invalid"
    assert status["message"] == (
        'TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: Invalid value: 500: '
        "may not specify a duration less than 10 minutes"
    )
    assert status["details"]["causes"][0]["field"] == "spec.expirationSeconds"


@pytest.mark.parametrize(
    "spec",
    [
        {"expirationSeconds": "3600"},
        {"expirationSeconds": True},
        {"audiences": "foo"},
        {"audiences": [1]},
    ],
)
def test_malformed_spec_is_a_bad_request(authority: TokenAuthority, spec: dict[str, Any]) -> None:
    with pytest.raises(StatusError) as caught:
        request_token(authority, spec)
    assert caught.value.code == 400


def test_body_names_must_match_the_service_account(authority: TokenAuthority) -> None:
    with pytest.raises(StatusError) as caught:
        authority.token_request({"metadata": {"name": "other"}}, namespace="default", service_account=SA)
    assert caught.value.code == 422 and "must match the service account name" in caught.value.message


def test_max_expiration_caps_the_lifetime(authority: TokenAuthority) -> None:
    answer = request_token(authority, {"expirationSeconds": 7200}, max_expiration_seconds=5)
    assert answer["spec"]["expirationSeconds"] == 5
    payload = decode_unverified(answer["status"]["token"])
    assert payload["exp"] - payload["iat"] == 5


def test_valid_token_authenticates_as_the_service_account(authority: TokenAuthority) -> None:
    token = request_token(authority)["status"]["token"]
    claims = authority.authenticate(token, now=NOW + 10)
    assert claims == TokenClaims("default", "demo", "uid-1", None, (ISSUER,), NOW + 3600)
    user = user_for_claims(claims)
    assert user.username == "system:serviceaccount:default:demo"
    assert user.groups == ("system:serviceaccounts", "system:serviceaccounts:default", "system:authenticated")
    assert user.uid == "uid-1"
    assert authority.authenticate(token, now=NOW + 10, **lookups()) == claims


def test_expired_or_not_yet_valid_tokens_do_not_authenticate(authority: TokenAuthority) -> None:
    token = request_token(authority, max_expiration_seconds=5)["status"]["token"]
    assert authority.authenticate(token, now=NOW + 4) is not None
    assert authority.authenticate(token, now=NOW + 60) is None
    assert authority.authenticate(token, now=NOW - 60) is None


def test_token_for_another_audience_does_not_authenticate_to_the_api(authority: TokenAuthority) -> None:
    token = request_token(authority, {"audiences": ["vault"]})["status"]["token"]
    assert authority.authenticate(token, now=NOW) is None


def test_tokens_of_another_key_or_tampered_do_not_authenticate(
    authority: TokenAuthority, other_authority: TokenAuthority
) -> None:
    foreign = other_authority.token_request({}, namespace="default", service_account=SA, now=NOW)["status"]["token"]
    assert authority.authenticate(foreign, now=NOW) is None
    header, payload, signature = request_token(authority)["status"]["token"].split(".")
    claims = b64url_json(payload)
    claims["sub"] = "system:serviceaccount:kube-system:admin"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert authority.authenticate(f"{header}.{forged_payload}.{signature}", now=NOW) is None


def test_alg_none_and_hs256_tokens_are_refused(authority: TokenAuthority) -> None:
    _, payload, _ = request_token(authority)["status"]["token"].split(".")
    for alg in ("none", "HS256"):
        header = base64.urlsafe_b64encode(json.dumps({"alg": alg}).encode()).rstrip(b"=").decode()
        assert authority.authenticate(f"{header}.{payload}.", now=NOW) is None


def test_deleted_or_recreated_service_account_invalidates_its_tokens(authority: TokenAuthority) -> None:
    token = request_token(authority)["status"]["token"]
    assert authority.authenticate(token, now=NOW, **lookups(sa=None)) is None
    recreated = {"metadata": {"name": "demo", "namespace": "default", "uid": "uid-2"}}
    assert authority.authenticate(token, now=NOW, **lookups(sa=recreated)) is None


def test_legacy_token_has_the_legacy_claims_and_lives_with_its_secret(authority: TokenAuthority) -> None:
    secret = {"metadata": {"name": "demo-token", "namespace": "default", "uid": "s-1"}}
    token = authority.legacy_token(namespace="default", service_account=SA, secret=secret)
    payload = decode_unverified(token)
    assert payload == {
        "iss": "kubernetes/serviceaccount",
        "kubernetes.io/serviceaccount/namespace": "default",
        "kubernetes.io/serviceaccount/secret.name": "demo-token",
        "kubernetes.io/serviceaccount/service-account.name": "demo",
        "kubernetes.io/serviceaccount/service-account.uid": "uid-1",
        "sub": "system:serviceaccount:default:demo",
    }
    claims = authority.authenticate(token, **lookups(secret=secret))
    assert claims is not None and claims.secret_name == "demo-token" and claims.expires_at is None
    assert authority.authenticate(token, **lookups(secret=None)) is None
    assert authority.authenticate(token, **lookups(sa=None, secret=secret)) is None


def test_token_review_authenticates_and_intersects_audiences(authority: TokenAuthority) -> None:
    token = request_token(authority, {"audiences": ["a", "b", ISSUER]})["status"]["token"]
    review = authority.token_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}},
        now=NOW,
        **lookups(),
    )
    assert review["kind"] == "TokenReview"
    assert review["status"] == {
        "authenticated": True,
        "user": {
            "username": "system:serviceaccount:default:demo",
            "uid": "uid-1",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:default", "system:authenticated"],
        },
        "audiences": [ISSUER],
    }
    scoped = authority.token_review({"spec": {"token": token, "audiences": ["b", "z"]}}, now=NOW, **lookups())
    assert scoped["status"]["authenticated"] is True and scoped["status"]["audiences"] == ["b"]
    wrong = authority.token_review({"spec": {"token": token, "audiences": ["z"]}}, now=NOW, **lookups())
    assert wrong["status"]["authenticated"] is False
    assert "token audiences" in wrong["status"]["error"]


def test_token_review_explains_a_refusal_without_the_token(authority: TokenAuthority) -> None:
    token = request_token(authority)["status"]["token"]
    review = authority.token_review({"spec": {"token": token}}, now=NOW, **lookups(sa=None))
    assert review["status"]["authenticated"] is False
    assert 'serviceaccounts "demo" not found' in review["status"]["error"]
    assert token not in json.dumps(review["status"])
    expired = authority.token_review({"spec": {"token": token}}, now=NOW + 7200, **lookups())
    assert "expired" in expired["status"]["error"]
    garbage = authority.token_review({"spec": {"token": "not-a-jwt"}}, **lookups())
    assert garbage["status"]["authenticated"] is False and garbage["status"]["error"]


def test_token_review_without_a_token_is_invalid(authority: TokenAuthority) -> None:
    for body in ({"spec": {}}, {"spec": {"token": ""}}, {}):
        with pytest.raises(StatusError) as caught:
            authority.token_review(body, **lookups())
        assert caught.value.code == 422
    with pytest.raises(StatusError) as caught:
        authority.token_review(None, **lookups())  # type: ignore[arg-type]
    assert caught.value.code == 400


def test_discovery_documents_verify_the_tokens(authority: TokenAuthority) -> None:
    config = authority.openid_configuration(f"{ISSUER}/openid/v1/jwks")
    assert config == {
        "issuer": ISSUER,
        "jwks_uri": f"{ISSUER}/openid/v1/jwks",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    (key,) = authority.jwks()["keys"]
    assert {key["kty"], key["alg"], key["use"], key["kid"]} == {"RSA", "RS256", "sig", authority.key_id}

    def as_int(text: str) -> int:
        return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")

    public_key = rsa.RSAPublicNumbers(as_int(key["e"]), as_int(key["n"])).public_key()
    header, payload, signature = request_token(authority)["status"]["token"].split(".")
    public_key.verify(
        base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)),
        f"{header}.{payload}".encode(),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )


def test_repr_never_shows_the_key(authority: TokenAuthority) -> None:
    assert "PRIVATE" not in repr(authority) and ISSUER in repr(authority)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=100).map(lambda b: base64.urlsafe_b64encode(b).decode())))
def test_garbage_tokens_never_authenticate_nor_raise(garbage: str) -> None:
    authority = _SHARED
    assert authority.authenticate(garbage) is None
    assert authority.authenticate(f"{garbage}.{garbage}.{garbage}") is None


_SHARED = TokenAuthority("https://fuzz", key_size=1024)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    iss=st.sampled_from(["https://fuzz", "kubernetes/serviceaccount"]),
    extra=st.dictionaries(
        st.sampled_from(["aud", "exp", "nbf", "kubernetes.io", "kubernetes.io/serviceaccount/namespace", "sub"]),
        _JSON,
    ),
)
def test_signed_but_odd_payloads_never_raise(iss: str, extra: dict[str, Any]) -> None:
    token = _SHARED._sign({"iss": iss, **extra})
    _SHARED.authenticate(token)
    review = _SHARED.token_review({"spec": {"token": token}}, **lookups())
    assert isinstance(review["status"]["authenticated"], bool)
