"""The pure part of kubemcsa.client.tokens: TokenRequest bodies and answers, legacy token Secrets, refresh times."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubemcsa.client import tokens
from kubemcsa.contract import api
from kubemcsa.contract import imports as imports_contract
from kubemcsa.contract.timefmt import parse_time

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_token_request_body_leaves_defaults_to_the_server() -> None:
    assert tokens.token_request_body(None, None)["spec"] == {}
    body = tokens.token_request_body(("a", "b"), 3600)
    assert body["kind"] == "TokenRequest"
    assert body["spec"] == {"audiences": ["a", "b"], "expirationSeconds": 3600}


def test_token_from_response_keeps_the_servers_expiry_and_hides_the_token() -> None:
    issued = tokens.token_from_response(
        {"status": {"token": "t0k", "expirationTimestamp": "2026-11-22T21:59:03Z"}}, 5.0
    )
    assert issued.token == "t0k" and issued.issued_at == 5.0
    assert issued.expires_at == parse_time("2026-11-22T21:59:03Z")
    assert issued.expiration_timestamp == "2026-11-22T21:59:03Z"
    assert "t0k" not in repr(issued)
    for answer in ({"status": {}}, {"status": {"token": ""}}, {}, [], None, {"status": "x"}):
        with pytest.raises(tokens.TokenAnswerError, match="without a token"):
            tokens.token_from_response(answer, 0)


def test_refresh_at_eighty_percent_and_never_for_legacy() -> None:
    assert imports_contract.refresh_time(100, 1100) == pytest.approx(100 + api.REFRESH_FRACTION * 1000)
    assert imports_contract.refresh_time(100, None) is None
    assert imports_contract.IssuedToken("t", 0, None).refresh_at is None


def test_legacy_secret_and_its_token() -> None:
    manifest = tokens.legacy_secret_manifest("bot", "ci")
    assert manifest["metadata"]["name"] == "bot-kubemcsa-token"
    assert manifest["type"] == "kubernetes.io/service-account-token"
    assert manifest["metadata"]["annotations"] == {"kubernetes.io/service-account.name": "bot"}
    assert tokens.is_token_secret_of(manifest, "bot") and not tokens.is_token_secret_of(manifest, "other")
    assert tokens.legacy_token_of(manifest) is None
    assert tokens.legacy_token_of({"data": {"token": "!!"}}) is None
    assert tokens.legacy_token_of({"data": {"token": base64.b64encode(b"tok\n").decode()}}) == "tok"
    assert tokens.legacy_ca_of({"data": {"ca.crt": base64.b64encode(CA).decode()}}) == CA
    assert tokens.legacy_ca_of({"data": {"ca.crt": base64.b64encode(b"junk").decode()}}) is None


@given(st.text(min_size=1, max_size=300).filter(lambda s: s.strip(".-")))
def test_legacy_secret_name_stays_a_valid_length(name: str) -> None:
    assert len(tokens.legacy_secret_name(name)) <= 253
    assert tokens.legacy_secret_name(name).endswith("-kubemcsa-token")


def test_a_tokens_subject_is_checked_against_the_account_asked_for() -> None:
    import base64 as b64
    import json as js

    from kubemcsa.client.tokens import subject_mismatch

    def jwt(claims: dict) -> str:
        body = b64.urlsafe_b64encode(js.dumps(claims).encode()).decode().rstrip("=")
        return f"eyJhbGciOiJub25lIn0.{body}.c2ln"

    assert subject_mismatch(jwt({"sub": "system:serviceaccount:ns:bot"}), "ns", "bot") is None
    other = subject_mismatch(jwt({"sub": "system:serviceaccount:kube-system:admin"}), "ns", "bot")
    assert other == "a token of 'system:serviceaccount:kube-system:admin'"
    assert subject_mismatch("opaque-token", "ns", "bot") == "a token that names no subject"
    assert subject_mismatch(jwt({"sub": 7}), "ns", "bot") == "a token that names no subject"
    assert "opaque" not in str(subject_mismatch("opaque-token", "ns", "bot"))
