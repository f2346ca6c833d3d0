"""The traffic rules every writer of an adapter's versions follows (sectune.serving.traffic):
`sectune promote`, a FineTuneSchedule's promotion and the operator's renderer."""

from __future__ import annotations

import copy

import pytest

from sectune.serving import traffic
from sectune.serving.config import ServedAdapter


def _versions(*shares: tuple[str, int | None]) -> list[dict]:  # type: ignore[type-arg]
    return [{"version": v} if t is None else {"version": v, "traffic": t} for v, t in shares]


def _shares(versions: list[dict]) -> dict[str, int]:  # type: ignore[type-arg]
    return {traffic.name(v): traffic.share(v) for v in versions}


def test_stable_is_the_most_traffic_first_on_a_tie_and_a_missing_traffic_is_100():
    assert traffic.name(traffic.stable(_versions(("v1", 50), ("v2", 50)))) == "v1"
    assert traffic.name(traffic.stable(_versions(("v1", 0), ("v2", None)))) == "v2"
    versions = _versions(("v1", 0), ("v2", 90), ("v3", 10))
    assert [traffic.name(v) for v in traffic.canaries(versions)] == ["v3"]
    assert [traffic.name(v) for v in traffic.standbys(versions)] == ["v1"]


def test_typed_versions_and_documents_follow_the_same_rule():
    typed = ServedAdapter.model_validate(
        {
            "name": "triage",
            "versions": [
                {"version": "v1", "uri": "s3://b/v1", "traffic": 50},
                {"version": "v2", "uri": "s3://b/v2", "traffic": 50},
            ],
        }
    )
    document = _versions(("v1", 50), ("v2", 50))
    assert traffic.stable(typed.versions).version == traffic.name(traffic.stable(document))


def test_promote_keeps_the_replaced_version_as_the_only_standby():
    versions = _versions(("v1", 0), ("v2", 100))
    said = traffic.promote(versions, {"version": "v3"})
    assert _shares(versions) == {"v2": 0, "v3": 100}
    assert said == "promoted: v3 at 100 %, v2 kept at 0 % for --rollback"


def test_a_canary_keeps_standbys_and_a_second_canary_is_refused_leaving_the_list_alone():
    versions = _versions(("v1", 0), ("v2", 100))
    traffic.add_canary(versions, {"version": "v3"}, 10)
    assert _shares(versions) == {"v1": 0, "v2": 90, "v3": 10}
    before = copy.deepcopy(versions)
    with pytest.raises(traffic.TrafficError, match=r"a canary is already in traffic \(v3 10 %\)"):
        traffic.add_canary(versions, {"version": "v4"}, 10)
    with pytest.raises(traffic.TrafficError, match="between 1 and 99"):
        traffic.add_canary(_versions(("v1", 100)), {"version": "v2"}, 100)
    assert versions == before


def test_finalize_and_rollback():
    canary = _versions(("v1", 0), ("v2", 90), ("v3", 10))
    finalized = copy.deepcopy(canary)
    assert traffic.finalize(finalized) == "finalized: v3 at 100 %, dropped v2"
    assert _shares(finalized) == {"v3": 100}

    rolled = copy.deepcopy(canary)
    assert traffic.rollback(rolled) == "rolled back: dropped canary v3; v2 at 100 %"
    assert _shares(rolled) == {"v1": 0, "v2": 100}
    # Without a canary, back to the standby; the version that replaced it goes.
    assert traffic.rollback(rolled) == "rolled back: v1 at 100 %, dropped v2"
    assert _shares(rolled) == {"v1": 100}
    with pytest.raises(traffic.TrafficError, match="nothing to roll back to"):
        traffic.rollback(rolled)
    with pytest.raises(traffic.TrafficError, match="nothing to finalize"):
        traffic.finalize(rolled)


def test_served_shares_give_a_rolled_back_canary_to_the_stable_version_and_add_up_to_100():
    versions = _versions(("v1", 70), ("v2", 20), ("v3", 10))
    assert traffic.served(versions, {"v1", "v2", "v3"}, {"v3"}) == {"v1": 80, "v2": 20, "v3": 0}
    # An unresolved canary: the others are scaled to 100 (the remainder to the largest).
    assert traffic.served(versions, {"v1", "v3"}, set()) == {"v1": 88, "v3": 12}
    assert traffic.served(_versions(("v1", 100), ("v2", 0)), {"v2"}, set()) == {}
