from hypothesis import given
from hypothesis import strategies as st

from kubemcsa.contract import api


def test_short_names_are_kept_readable():
    assert api.secret_name_for_import("cluster2-default-pod-lister") == "cluster2-default-pod-lister-token"
    assert api.volume_name_for_import("cluster2-default-pod-lister") == "sai-cluster2-default-pod-lister"
    assert api.argocd_secret_name_for_import("prod-eu") == "prod-eu-argocd"
    assert api.import_name_for_argocd_secret("prod-eu-argocd") == "prod-eu"
    assert api.import_name_for_argocd_secret("prod-eu") is None
    assert api.import_name_for_argocd_secret("-argocd") is None
    assert api.mount_path_for_import("x") == "/var/run/secrets/admiralty.io/serviceaccountimports/x"


def test_annotation_tolerates_blanks_and_repeats():
    assert api.parse_import_annotation(" a, ,b,a ,") == ["a", "b"]
    assert api.parse_import_annotation("") == []
    assert api.parse_import_annotation(None) == []


def test_namespace_enabled_only_with_exact_label():
    assert api.namespace_enabled({"multicluster-service-account": "enabled"})
    assert not api.namespace_enabled({"multicluster-service-account": "true"})
    assert not api.namespace_enabled(None)


subdomains = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,250}[a-z0-9])?", fullmatch=True).filter(api.is_dns_subdomain)


@given(subdomains)
def test_derived_names_are_always_valid_and_distinct_per_import(name):
    assert api.is_dns_subdomain(api.secret_name_for_import(name))
    assert api.is_dns_subdomain(api.argocd_secret_name_for_import(name))
    # The import's two Secrets never share a name, even cut short.
    assert api.argocd_secret_name_for_import(name) != api.secret_name_for_import(name)
    assert api.is_dns_label(api.volume_name_for_import(name))


def test_long_names_differ_by_hash():
    a, b = "a" * 250 + "x", "a" * 250 + "y"
    assert api.secret_name_for_import(a) != api.secret_name_for_import(b)
    assert api.argocd_secret_name_for_import(a) != api.argocd_secret_name_for_import(b)
    assert api.volume_name_for_import(a) != api.volume_name_for_import(b)
    assert api.volume_name_for_import("a.b") != api.volume_name_for_import("a-b")


def test_a_hashed_volume_name_never_meets_a_plain_one() -> None:
    # Both were sai-a-b-2e7336dc once: a pod naming both got two volumes of one name, which the API server refuses.
    assert api.volume_name_for_import("a.b") == "sai--a-b-2e7336dc"
    assert api.volume_name_for_import("a-b-2e7336dc") == "sai-a-b-2e7336dc"


def test_colliding_short_hashes_are_told_apart_by_position() -> None:
    # Two names with the same head and the same 8-digit hash (found by search): the pod still gets two volumes.
    a, b = "a" * 60 + ".136926", "a" * 60 + ".170219"
    assert api.volume_name_for_import(a) == api.volume_name_for_import(b)
    first, second = api.volume_names_for_imports([a, b])
    assert first == api.volume_name_for_import(a) and second == first + "-1"
    assert api.is_dns_label(second)


@given(st.lists(subdomains, max_size=api.MAX_IMPORTS_PER_POD, unique=True))
def test_volume_names_of_a_pod_are_distinct_valid_labels_by_construction(names: list[str]) -> None:
    volumes = api.volume_names_for_imports(names)
    assert len(set(volumes)) == len(names)
    assert all(api.is_dns_label(volume) for volume in volumes)


plain_or_hashed = st.one_of(
    subdomains, st.from_regex(r"[a-z0-9]([a-z0-9-]{0,57}[a-z0-9])?", fullmatch=True), st.just("a.b")
)


@given(plain_or_hashed, plain_or_hashed)
def test_volume_names_of_two_imports_differ_unless_their_hashes_collide(a: str, b: str) -> None:
    if a != b:
        assert api.volume_name_for_import(a) != api.volume_name_for_import(b)


def test_annotation_parsing_is_linear_and_stops_past_the_limit() -> None:
    # 80,000 names took 27.6 s when duplicates were removed with a list; a dict makes it one pass.
    value = ",".join(f"name-{i}" for i in range(80_000)) + ",name-0"
    assert len(api.parse_import_annotation(value)) == 80_000
    limited = api.parse_import_annotation(value, limit=api.MAX_IMPORTS_PER_POD)
    assert limited == [f"name-{i}" for i in range(api.MAX_IMPORTS_PER_POD + 1)]
    assert api.parse_import_annotation("a,a,a,b", limit=1) == ["a", "b"]
    assert api.parse_import_annotation("a,,a ,", limit=1) == ["a"]
