from hypothesis import given
from hypothesis import strategies as st

from kubemcsa import api


def test_short_names_are_kept_readable():
    assert api.secret_name_for_import("cluster2-default-pod-lister") == "cluster2-default-pod-lister-token"
    assert api.volume_name_for_import("cluster2-default-pod-lister") == "sai-cluster2-default-pod-lister"
    assert api.argocd_secret_name_for_import("prod-eu") == "prod-eu-argocd"
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
