"""The pure part of `kubemcsa status`: one line per import, what to fix below the table."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from kubemcsa.cli import status

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)


def sai(
    name: str, ns: str = "default", ready: str | None = "True", reason: str = "TokenIssued", **status_fields
) -> dict:
    obj = {
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": {"clusterName": "cluster2", "namespace": "default", "name": "pod-lister"},
        "status": dict(status_fields),
    }
    if ready is not None:
        obj["status"]["conditions"] = [
            {
                "type": "Ready",
                "status": ready,
                "reason": reason,
                "message": f"{name} says {reason}",
                "observedGeneration": 1,
            }
        ]
    return obj


def test_rows_read_conditions_and_expiry() -> None:
    rows = status.rows(
        [
            sai("b", expirationTimestamp="2026-11-22T15:30:00Z"),
            sai("a", ready="False", reason="RemoteServiceAccountNotFound"),
            sai("c", ready=None),
        ],
        NOW,
    )
    assert [r.name for r in rows] == ["a", "b", "c"]
    assert (rows[1].ready, rows[1].reason, rows[1].expires_in, rows[1].remote) == (
        "True",
        "TokenIssued",
        "3h30m",
        "default/pod-lister",
    )
    assert (rows[0].ready, rows[0].reason) == ("False", "RemoteServiceAccountNotFound")
    assert (rows[2].ready, rows[2].reason) == ("Unknown", "NotReconciled")


def test_a_condition_about_an_older_generation_is_not_trusted() -> None:
    obj = sai("a")
    obj["metadata"]["generation"] = 2
    assert status.import_status(obj, NOW).reason == "SpecChanged"


def test_table_lists_imports_then_what_to_fix() -> None:
    rows = status.rows([sai("good"), sai("bad", ready="False", reason="Forbidden")], NOW)
    text = status.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "CLUSTER", "REMOTE", "READY", "REASON", "EXPIRES", "IN"]
    assert lines[1].split()[:6] == ["default", "bad", "cluster2", "default/pod-lister", "False", "Forbidden"]
    assert lines[-1] == "default/bad: bad says Forbidden"
    assert "good says" not in text
    one_namespace = status.format_table(rows, show_namespace=False)
    assert one_namespace.splitlines()[0].startswith("NAME ")
    assert status.format_table([]) == "No ServiceAccountImports found.\n"


def test_expires_in() -> None:
    assert status.expires_in(None, NOW) == "-"
    assert status.expires_in("garbage", NOW) == "-"
    assert status.expires_in("2026-11-22T11:55:00Z", NOW) == "expired 5m ago"
    assert status.expires_in("2026-11-24T13:00:00Z", NOW) == "2d1h"
    assert status.expires_in("2026-11-22T12:00:30+00:00", NOW) == "30s"


@given(st.recursive(st.none() | st.text() | st.integers(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)))
def test_malformed_imports_never_crash(obj) -> None:
    candidate = obj if isinstance(obj, dict) else {"status": obj, "spec": obj, "metadata": obj}
    status.format_table([status.import_status(candidate, NOW)])


def test_a_federated_import_calls_the_source_as_each_pods_own_service_account() -> None:
    fed = sai("fed", reason="Federated")
    fed["spec"] = {"clusterName": "cluster2", "namespace": "default", "tokenType": "Federated"}
    (row,) = status.rows([fed], NOW)
    assert (row.ready, row.reason, row.remote, row.expires_in) == ("True", "Federated", "default/(each pod's own)", "-")
