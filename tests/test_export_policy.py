"""The export policy (kubemcsa/contract/export_policy.py): parsing export-to leniently but safely, matching,
verdicts."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubemcsa.contract import api
from kubemcsa.contract.export_policy import (
    MAX_EXPORT_TO_ENTRIES,
    MAX_EXPORT_TO_LENGTH,
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


# --- bounded, linear parsing (issue 17) --------------------------------------------------------------------------


def test_an_export_to_of_100k_entries_is_refused_naming_the_cap() -> None:
    # Once: 10k entries took the controller 11.6 s, 20k 45.9 s (a list scanned for repeats at every item).
    value = ", ".join(f"cluster1/ns-{i}" for i in range(100_000))
    export_to = parse_export_to(value)
    assert export_to.too_large and export_to.patterns == () and not export_to.allows("cluster1", "ns-1")
    refused = verdict(sa(EXPORTED, value), ns="ns-1")
    assert (refused.allowed, refused.reason) == (False, api.REASON_NOT_EXPORTED)
    assert str(MAX_EXPORT_TO_LENGTH) in refused.message and len(refused.message) < 600


def test_more_entries_than_the_cap_within_the_length_are_refused_too() -> None:
    value = ",".join(f"c/n{i}" for i in range(MAX_EXPORT_TO_ENTRIES + 1))
    assert len(value) <= MAX_EXPORT_TO_LENGTH
    refused = verdict(sa(EXPORTED, value), consumer="c", ns="n1")
    assert not refused.allowed and f"more than the {MAX_EXPORT_TO_ENTRIES} entries" in refused.message
    at_cap = ",".join(f"c/n{i}" for i in range(MAX_EXPORT_TO_ENTRIES))
    assert len(parse_export_to(at_cap).patterns) == MAX_EXPORT_TO_ENTRIES
    assert verdict(sa(EXPORTED, at_cap), consumer="c", ns=f"n{MAX_EXPORT_TO_ENTRIES - 1}").allowed
    # Separators and repeats do not count as entries of their own: only what is parsed is counted.
    repeated = ",, ;".join(["c/n1"] * MAX_EXPORT_TO_ENTRIES)
    assert parse_export_to(repeated).patterns == (ExportPattern("c", "n1"),)


def test_repeats_are_dropped_without_a_quadratic_scan() -> None:
    # Many distinct patterns at the cap, then each once more: the same patterns once, in their first order.
    half = [f"cluster1/ns-{i}" for i in range(MAX_EXPORT_TO_ENTRIES // 2)]
    export_to = parse_export_to(",".join(half + half))
    assert [str(p) for p in export_to.patterns] == half


@given(st.lists(st.sampled_from(["c/a", "c/*", "*/b", "x", "c/a/b", " ", ";", "C / A", "c/**"]), max_size=60))
def test_the_parser_agrees_with_a_plain_reading(items: list[str]) -> None:
    value = ",".join(items)
    export_to = parse_export_to(value)
    expected: list[str] = []
    for item in value.replace(" / ", "/").replace(";", ",").replace(" ", ",").split(","):
        try:
            pattern = str(parse_pattern(item))
        except ValueError:
            continue
        if pattern not in expected:
            expected.append(pattern)
    assert [str(p) for p in export_to.patterns] == expected
    assert export_to.too_large == ""


@given(st.text(alphabet=st.sampled_from("ab/*,; \n-."), min_size=1, max_size=40))
def test_any_value_over_the_length_cap_exports_to_nobody(unit: str) -> None:
    value = unit * (MAX_EXPORT_TO_LENGTH // len(unit) + 1)
    export_to = parse_export_to(value)
    assert export_to.too_large and export_to.patterns == ()


# --- an unknown consumer name (issue 17) ---------------------------------------------------------------------------


def test_a_star_cluster_pattern_matches_whatever_this_cluster_is_called() -> None:
    assert verdict(sa(EXPORTED, "*/team-a"), consumer=None).allowed
    assert verdict(sa(EXPORTED, "cluster9/x, */team-*"), consumer=None).allowed
    # A named cluster pattern cannot be decided without the name: the message says to give it.
    named = verdict(sa(EXPORTED, "cluster1/team-a"), consumer=None)
    assert (named.allowed, named.reason) == (False, api.REASON_NOT_EXPORTED)
    assert "--cluster-name" in named.message and "depends on its name" in named.message
    # Not exported to this namespace at all: said as usual, and the missing name too.
    elsewhere = verdict(sa(EXPORTED, "*/team-b"), consumer=None)
    assert not elsewhere.allowed and "not to <this cluster>/team-a" in elsewhere.message
    assert "--cluster-name" in elsewhere.message


def test_the_timestamps_the_controller_reads_from_its_secrets_annotations_are_bounded_too() -> None:
    from kubemcsa.contract.timefmt import format_time, parse_time

    assert parse_time(format_time(1_800_000_000)) == 1_800_000_000
    assert parse_time("2027-01-15T08:00:00.123456+01:00") is not None
    assert parse_time("2027-01-15T08:00:00Z" + " " * 1_000_000) is None
