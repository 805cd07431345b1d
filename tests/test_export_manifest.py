"""The pure part of export: durations and the manifest (token requests: test_tokens.py)."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from kubemcsa.cli import export
from kubemcsa.contract import api
from kubemcsa.contract.credentials import Credentials, from_secret_data

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("3600s", 3600), ("90m", 5400), ("24h", 86400), ("1h30m", 5400), ("7d", 604800), (" 1H ", 3600)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert export.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1x", "1h 30m", "-5m", "1.5h", "5m", "599s"])
def test_parse_duration_refuses_garbage_and_too_short(text: str) -> None:
    with pytest.raises(ValueError, match="duration|minimum"):
        export.parse_duration(text)


@given(st.text(max_size=20))
def test_parse_duration_only_raises_value_error(text: str) -> None:
    try:
        assert export.parse_duration(text) >= api.MIN_EXPIRATION_SECONDS
    except ValueError:
        pass


def test_manifest_has_the_five_keys_and_annotations_and_round_trips_through_yaml() -> None:
    creds = Credentials(server="https://c2:6443", ca_crt=CA, token="secret-token", namespace="default")
    manifest = export.export_manifest(
        creds,
        cluster_name="c2",
        export_name="c2-pod-lister",
        service_account="pod-lister",
        expiration_timestamp="2026-11-23T00:00:00Z",
    )
    parsed = yaml.safe_load(export.render_yaml(manifest))
    assert parsed["apiVersion"] == "v1"
    assert parsed["kind"] == "Secret"
    assert parsed["metadata"]["name"] == "c2-pod-lister"
    assert "namespace" not in parsed["metadata"]  # goes wherever kubectl apply puts it
    assert parsed["metadata"]["annotations"] == {
        export.EXPORTED_FROM_ANNOTATION: "c2/default/pod-lister",
        export.EXPIRATION_ANNOTATION: "2026-11-23T00:00:00Z",
    }
    assert sorted(parsed["data"]) == sorted(api.SECRET_KEYS)
    assert from_secret_data(parsed["data"]) == creds


def test_default_export_name() -> None:
    assert export.default_export_name("pod-lister") == "pod-lister-token"
