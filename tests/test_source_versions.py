"""controller.outputs.versions.SourceVersions against an in-memory API server over HTTPS: one call per source
however many imports ask, a probe (`max_age`) asks again, and a source that does not answer is remembered as such
(what a federated import's ClusterProfile health reads) without any credential in the words."""

from __future__ import annotations

from controller.outputs.versions import SourceVersions


def test_one_call_serves_every_import_of_a_source(api_server_factory) -> None:
    source = api_server_factory(name="cluster2")
    now = [1000.0]
    versions = SourceVersions(timeout=3.0, clock=lambda: now[0])
    for _ in range(5):
        assert versions.get("cluster2", source.url, source.ca_pem, "", None) == ("v1.36.0-kubemcsa", None)
    assert versions.calls == 1 and versions.problem("cluster2") is None


def test_a_probe_asks_again_once_the_answer_is_older_than_its_max_age(api_server_factory) -> None:
    source = api_server_factory(name="cluster2")
    now = [1000.0]
    versions = SourceVersions(timeout=3.0, clock=lambda: now[0])
    versions.get("cluster2", source.url, source.ca_pem, "", None)
    versions.get("cluster2", source.url, source.ca_pem, "", None, max_age=15)
    assert versions.calls == 1  # still fresh
    now[0] += 15
    versions.get("cluster2", source.url, source.ca_pem, "", None, max_age=15)
    assert versions.calls == 2

    source.make_unreachable()
    now[0] += 15
    version, problem = versions.get("cluster2", source.url, source.ca_pem, "", None, max_age=15)
    assert version is None and problem and problem.startswith("it did not answer the controller")
    assert versions.problem("cluster2") == problem
    # Without max_age a failure stands for retry_seconds: the reconciles of its imports make no call meanwhile.
    versions.get("cluster2", source.url, source.ca_pem, "", None)
    assert versions.calls == 3

    source.make_reachable()
    now[0] += 15
    assert versions.get("cluster2", source.url, source.ca_pem, "", None, max_age=15) == ("v1.36.0-kubemcsa", None)
    assert versions.problem("cluster2") is None and versions.calls == 4


def test_a_source_never_asked_has_no_problem() -> None:
    assert SourceVersions().problem("nowhere") is None


def test_a_federated_source_and_a_token_source_of_one_name_keep_their_own_answers(api_server_factory) -> None:
    """Keyed by name alone, each would overwrite the other's answer: a down federated source would read healthy
    after its token namesake answered, and both would ask again at every turn."""
    token_source, federated_source = api_server_factory(name="cluster2"), api_server_factory(name="cluster2-oidc")
    federated_source.make_unreachable()
    versions = SourceVersions(timeout=3.0)
    _, problem = versions.get("cluster2", federated_source.url, federated_source.ca_pem, "", None, federated=True)
    assert problem
    assert versions.get("cluster2", token_source.url, token_source.ca_pem, "", None) == ("v1.36.0-kubemcsa", None)
    assert versions.problem("cluster2", federated=True) == problem and versions.problem("cluster2") is None
    versions.get("cluster2", federated_source.url, federated_source.ca_pem, "", None, federated=True)
    versions.get("cluster2", token_source.url, token_source.ca_pem, "", None)
    assert versions.calls == 2
