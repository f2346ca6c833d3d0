"""The traffic rules of one adapter's versions, written once.

Which version is stable, which are canaries and which are standbys, and what promoting, adding
a canary, finalizing and rolling back do to an adapter's `versions`. Used by the operator's
renderer and canary analysis (on the typed spec), by `sectune promote` (on a ruamel round-trip
document, so comments and key order survive) and by a FineTuneSchedule's promotion (on the
AdapterDeployment custom object). Pure: nothing here reads or writes anything else.

- stable: the version with the most traffic (the first of those on a tie). A canary is measured
  against it and rolled back to it.
- canary: any other version with traffic above 0.
- standby: a version at traffic 0: loaded, pinnable as `name@version`, and what a rollback
  without a canary returns to.

Edits change the list in place and return what was done, in words; an edit that cannot be made
raises TrafficError and leaves the list as it was.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any, Protocol, TypeVar

DEFAULT_TRAFFIC = 100
"""A version without `traffic` answers all of its adapter's requests (the API's default)."""


class TrafficError(ValueError):
    """The edit cannot be made; the message says why and what to do."""


class _Shared(Protocol):
    version: str
    traffic: int


Version = Mapping[str, Any] | _Shared
"""An entry of `versions`: a document's mapping or a typed spec's version."""
V = TypeVar("V", bound=Version)


def share(version: Version) -> int:
    """The percent of its adapter's requests a version answers."""
    if isinstance(version, Mapping):
        return int(version.get("traffic", DEFAULT_TRAFFIC))
    return version.traffic


def name(version: Version) -> str:
    return str(version["version"] if isinstance(version, Mapping) else version.version)


def stable(versions: Sequence[V]) -> V:
    """The version with the most traffic (the first of those on a tie)."""
    return max(versions, key=share)


def canaries(versions: Sequence[V]) -> list[V]:
    """Versions in traffic other than the stable one."""
    main = stable(versions)
    return [v for v in versions if share(v) > 0 and v is not main]


def standbys(versions: Sequence[V]) -> list[V]:
    """Versions at traffic 0."""
    return [v for v in versions if share(v) == 0]


def pick(versions: Sequence[V], rng: random.Random) -> V:
    """The version that answers a request for the adapter's unpinned name: drawn by traffic
    share (alike when every share is 0: only standbys are left). Both runtimes route with it:
    the sectune server's registry and the router in front of vLLM."""
    weights = [share(v) for v in versions]
    if not any(weights):
        weights = [1] * len(versions)
    return rng.choices(versions, weights=weights)[0]


# --------------------------------------------------------------------------- edits

Entries = MutableSequence[MutableMapping[str, Any]]


def _drop(versions: Entries, keep: list[MutableMapping[str, Any]]) -> None:
    for entry in [v for v in versions if not any(v is k for k in keep)]:
        versions.remove(entry)


def promote(versions: Entries, entry: MutableMapping[str, Any]) -> str:
    """The new version takes all the traffic; the stable one stays at 0 as the standby a
    rollback returns to; every other version (older standbys, a canary) is dropped."""
    main = stable(versions)
    _drop(versions, [main])
    main["traffic"] = 0
    entry["traffic"] = DEFAULT_TRAFFIC
    versions.append(entry)
    return f"promoted: {name(entry)} at 100 %, {name(main)} kept at 0 % for --rollback"


def add_canary(versions: Entries, entry: MutableMapping[str, Any], percent: int) -> str:
    """The new version gets `percent`, the stable one the rest; standbys stay. Refused while
    another canary is in traffic."""
    if not 0 < percent < 100:
        raise TrafficError(f"canary {percent} %: give a percentage between 1 and 99")
    _refuse_canary(versions)
    main = stable(versions)
    main["traffic"] = DEFAULT_TRAFFIC - percent
    entry["traffic"] = percent
    versions.append(entry)
    return f"canary: {name(entry)} at {percent} %, {name(main)} at {100 - percent} %"


def finalize(versions: Entries) -> str:
    """The canary takes all the traffic; every other version is dropped."""
    running = canaries(versions)
    if not running:
        raise TrafficError("nothing to finalize: no canary in traffic")
    if len(running) > 1:
        raise TrafficError("several canaries in traffic; finalize by hand")
    [winner], main = running, stable(versions)
    _drop(versions, [winner])
    winner["traffic"] = DEFAULT_TRAFFIC
    return f"finalized: {name(winner)} at 100 %, dropped {name(main)}"


def rollback(versions: Entries) -> str:
    """A canary in traffic is dropped and the stable version gets all the traffic; without a
    canary, the newest standby gets it and the version that replaced it is dropped."""
    main, running = stable(versions), canaries(versions)
    if running:
        _drop(versions, [v for v in versions if not any(v is r for r in running)])
        main["traffic"] = DEFAULT_TRAFFIC
        dropped = ", ".join(name(v) for v in running)
        return f"rolled back: dropped canary {dropped}; {name(main)} at 100 %"
    waiting = standbys(versions)
    if not waiting:
        raise TrafficError("nothing to roll back to: no canary in traffic and no standby version")
    versions.remove(main)
    waiting[-1]["traffic"] = DEFAULT_TRAFFIC
    return f"rolled back: {name(waiting[-1])} at 100 %, dropped {name(main)}"


def _refuse_canary(versions: Entries) -> None:
    running = canaries(versions)
    if running:
        listed = ", ".join(f"{name(v)} {share(v)} %" for v in running)
        raise TrafficError(
            f"a canary is already in traffic ({listed}); finalize it or roll it back first"
        )


# --------------------------------------------------------------------------- what is served


def served(
    versions: Sequence[Version], servable: Collection[str], rolled_back: Collection[str]
) -> dict[str, int]:
    """Each servable version's share of the requests: a rolled-back canary's traffic goes to
    the stable version, and the shares are scaled to add up to 100 (the remainder to the
    largest). Empty when no servable version has traffic."""
    weights = {
        name(v): 0 if name(v) in rolled_back else share(v) for v in versions if name(v) in servable
    }
    main = name(stable(versions))
    if main in weights:
        weights[main] += sum(
            share(v) for v in versions if name(v) in rolled_back and name(v) in weights
        )
    total = sum(weights.values())
    if not total:
        return {}
    shares = {version: weight * 100 // total for version, weight in weights.items()}
    largest = max(weights, key=lambda version: weights[version])
    shares[largest] += 100 - sum(shares.values())
    return shares
