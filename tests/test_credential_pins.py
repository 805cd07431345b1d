"""The pins of source credentials (kubemcsa.contract.imports), pure: who wrote a credential Secret, told from
data alone."""

from __future__ import annotations

from typing import Any

from controller.conditions import status_patch
from kubemcsa.contract import imports


def secret(data: str, uid: str = "secret-uid") -> dict[str, Any]:
    return {"metadata": {"name": "c2-token", "uid": uid}, "data": {"token": data}}


def pinned_import(*secrets: dict[str, Any]) -> dict[str, Any]:
    pins = [imports.credential_pin(s) for s in secrets]
    return {"metadata": {"name": "c2", "resourceVersion": "7"}, "status": {imports.STATUS_PINS: pins}}


def test_a_secret_counts_only_with_its_own_uid_and_data() -> None:
    good = secret("dG9r")
    imp = pinned_import(good)
    assert imports.is_pinned(good, imp)
    assert not imports.is_pinned(secret("ZXZpbA=="), imp)  # other data
    assert not imports.is_pinned(secret("dG9r", uid="recreated"), imp)  # same data, another Secret
    assert not imports.is_pinned(good, {"metadata": {}})  # nothing pinned (written before pins existed)
    assert not imports.is_pinned(None, imp)


def test_a_pin_written_before_the_secret_exists_matches_its_data_alone() -> None:
    body = secret("bmV3", uid="")
    imp = {"status": {imports.STATUS_PINS: imports.pins_for_write({}, None, body)}}
    assert imports.is_pinned(secret("bmV3", uid="assigned-at-create"), imp)
    assert not imports.is_pinned(secret("b3RoZXI=", uid="assigned-at-create"), imp)


def test_the_replaced_secret_stays_good_until_the_write_lands_and_an_unpinned_one_never() -> None:
    old, new = secret("b2xk"), secret("bmV3")
    pins = imports.pins_for_write(pinned_import(old), old, new)
    imp = {"status": {imports.STATUS_PINS: pins}}
    assert imports.is_pinned(old, imp) and imports.is_pinned(new, imp)  # a crash between the two writes loses nothing
    forged = secret("Zm9yZ2Vk")
    pins = imports.pins_for_write(pinned_import(old), forged, new)  # rewriting a Secret nobody pinned
    assert pins == [imports.credential_pin(new)]
    assert len(imports.pins_for_write(pinned_import(new), new, new)) == 1


def test_the_pins_patch_is_guarded_by_the_imports_version() -> None:
    patch = imports.pins_patch(pinned_import(), [{"secretUID": "", "dataSHA256": "x"}])
    assert patch["metadata"] == {"resourceVersion": "7"}
    assert patch["status"] == {imports.STATUS_PINS: [{"secretUID": "", "dataSHA256": "x"}]}


def test_the_controllers_status_writes_leave_the_pins_alone() -> None:
    old = {imports.STATUS_PINS: [{"dataSHA256": "x"}], "observedGeneration": 1}
    assert status_patch(old, {"observedGeneration": 2}) == {"status": {"observedGeneration": 2}}
    assert status_patch(old, {**old, "observedGeneration": 2}) == {"status": {"observedGeneration": 2}}


def test_malformed_pins_are_ignored() -> None:
    imp = {"status": {imports.STATUS_PINS: ["x", {"secretUID": 3}, {"dataSHA256": ""}, None]}}
    assert imports.credential_pins(imp) == []
    assert imports.credential_pins({"status": {imports.STATUS_PINS: "nope"}}) == []
