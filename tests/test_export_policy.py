"""The export policy (kubemcsa/export_policy.py): parsing export-to leniently but safely, matching, verdicts."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubemcsa import api
from kubemcsa.export_policy import (
    ExportPattern,
    export_verdict,
    format_export_to,
    glob_match,
    parse_export_to,
    parse_pattern,
)

alphabet = st.sampled_from("ab-.*")
parts = st.text(alphabet=st.sampled_from("ab-."), min_size=1, max_size=8)


def sa(labels: dict | None = None, export_to: str | None = None, uid: str = "u1") -> dict:
    meta: dict = {"name": "bot", "namespace": "team-x", "uid": uid, "labels": labels or {}}
    if export_to is not None:
        meta["annotations"] = {api.EXPORT_TO_ANNOTATION: export_to}
    return {"metadata": meta}


EXPORTED = {api.EXPORTED_LABEL: "true"}
WHERE = {"source": "cluster2", "namespace": "team-x", "name": "bot"}


def verdict(account: dict | None, consumer: str = "cluster1", ns: str = "team-a", exists: bool | None = None):
    return export_verdict(account, exists=exists, consumer=consumer, import_namespace=ns, **WHERE)


def test_the_issue_example() -> None:
    export_to = parse_export_to("cluster1/team-a, cluster1/ci-*, cluster3/*")
    assert [str(p) for p in export_to.patterns] == ["cluster1/team-a", "cluster1/ci-*", "cluster3/*"]
    assert export_to.allows("cluster1", "team-a")
    assert export_to.allows("cluster1", "ci-main")
    assert export_to.allows("cluster3", "anything")
    assert not export_to.allows("cluster1", "team-b")
    assert not export_to.allows("cluster2", "team-a")
    assert not export_to.allows("cluster1", "ci")  # "ci-*" needs the dash


def test_lenient_about_separators_blanks_case_and_repeats() -> None:
    export_to = parse_export_to(" Cluster1 / team-a ;cluster1/team-a\n cluster3/** ,, ")
    assert [str(p) for p in export_to.patterns] == ["cluster1/team-a", "cluster3/*"]
    assert export_to.rejected == ()


@pytest.mark.parametrize("item", ["cluster1", "*", "a/b/c", "/team-a", "cluster1/", "c1/team_a", "c1/team?", "c1/[ab]"])
def test_an_item_that_is_not_a_pattern_matches_nothing(item: str) -> None:
    export_to = parse_export_to(f"{item}, cluster1/team-a")
    assert export_to.rejected == (item,)
    assert [str(p) for p in export_to.patterns] == ["cluster1/team-a"]
    assert not export_to.allows("cluster1", "team-b")
    with pytest.raises(ValueError, match="CLUSTER/NAMESPACE|not a name or a pattern"):
        parse_pattern(item)


@pytest.mark.parametrize("value", [None, 42, ["cluster1/team-a"], {"a": "b"}, "", " , "])
def test_anything_but_a_string_exports_to_nobody(value) -> None:
    assert parse_export_to(value).patterns == ()


def test_only_literal_cluster_parts_can_be_granted_by_rbac() -> None:
    assert parse_pattern("cluster1/*").cluster_is_literal
    assert not parse_pattern("prod-*/ci").cluster_is_literal


@given(st.text(max_size=200))
def test_parsing_any_text_never_fails_and_gives_valid_patterns(value: str) -> None:
    export_to = parse_export_to(value)
    for pattern in export_to.patterns:
        assert re.fullmatch(r"[a-z0-9.*-]+", pattern.cluster) and re.fullmatch(r"[a-z0-9.*-]+", pattern.namespace)
        assert parse_pattern(str(pattern)) == pattern
    assert parse_export_to(format_export_to(export_to.patterns)).patterns == export_to.patterns


def reference_match(pattern: str, text: str) -> bool:
    return re.fullmatch("".join(".*" if c == "*" else re.escape(c) for c in pattern), text, re.DOTALL) is not None


@given(st.text(alphabet=alphabet, max_size=10), st.text(alphabet=st.sampled_from("ab-."), max_size=12))
def test_glob_match_agrees_with_a_regex(pattern: str, text: str) -> None:
    assert glob_match(pattern, text) == reference_match(pattern, text)


@given(parts, parts)
def test_a_literal_pattern_matches_only_itself(cluster: str, namespace: str) -> None:
    pattern = ExportPattern(cluster, namespace)
    assert pattern.matches(cluster, namespace)
    assert not pattern.matches(cluster + "x", namespace)
    assert not pattern.matches(cluster, namespace + "x")


def test_matching_is_fast_on_adversarial_patterns() -> None:
    # A regex of many ".*" backtracks exponentially on this; glob_match is quadratic at worst.
    assert not glob_match("a*" * 60 + "b", "a" * 200)


def test_verdicts() -> None:
    assert verdict(sa(EXPORTED, "cluster1/team-a")).allowed
    assert verdict(sa(EXPORTED, "cluster1/*")).allowed

    refused = verdict(sa(EXPORTED, "cluster1/other-ns"))
    assert (refused.allowed, refused.reason) == (False, api.REASON_NOT_EXPORTED)
    assert "exported to 'cluster1/other-ns', not to cluster1/team-a" in refused.message
    assert "kubemcsa allow bot -n team-x --context cluster2 --to cluster1/team-a" in refused.message

    for account in (sa({}, "cluster1/team-a"), sa({api.EXPORTED_LABEL: "yes"}, "cluster1/team-a"), None):
        refused = verdict(account)
        assert (refused.allowed, refused.reason) == (False, api.REASON_NOT_EXPORTED)
        assert "is not exported" in refused.message

    assert "exported to nobody" in verdict(sa(EXPORTED)).message
    assert "not CLUSTER/NAMESPACE: 'cluster1'" in verdict(sa(EXPORTED, "cluster1")).message

    missing = verdict(None, exists=False)
    assert (missing.allowed, missing.reason) == (False, api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND)
    assert verdict(None, exists=True).reason == api.REASON_NOT_EXPORTED


@given(st.dictionaries(st.text(max_size=5), st.one_of(st.none(), st.text(max_size=5), st.integers())))
def test_a_malformed_service_account_is_refused_not_crashed(metadata: dict) -> None:
    assert not verdict({"metadata": metadata}).allowed
    assert not verdict({"metadata": {"labels": metadata, "annotations": metadata}}).allowed


def test_a_long_annotation_is_quoted_short() -> None:
    refused = verdict(sa(EXPORTED, "x" * 10_000 + "/y"))
    assert len(refused.message) < 1000
