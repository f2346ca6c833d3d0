"""`sectune promote`: put a trained version into an AdapterDeployment YAML in a Git working tree.

The edit is made in place with ruamel.yaml's round trip, so comments, key order, anchors and the
other documents of the file survive and the diff is the change itself. What it does to one
adapter's `versions` (the rules are sectune.serving.traffic's, shared with the operator):

- promote (no flag): the new version takes 100 % traffic; the version it replaces stays listed
  at traffic 0 (loaded, pinnable, and what `--rollback` returns to); older standbys are dropped.
- `--canary P`: the new version gets P %, the stable version the rest; refused while another
  canary is in traffic.
- `--finalize`: the canary takes 100 % and the old stable version is dropped.
- `--rollback`: a canary in traffic is dropped and the stable version gets 100 %; otherwise the
  standby (traffic 0) gets 100 % and the version that replaced it is dropped.

A version comes from a FineTuneJob (its status, read from the cluster) or from storage; either
way its manifest.json is read from storage, hashed, and must match the digest the job reported,
and its gates must have passed. Anything refused leaves the file byte-identical.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from sectune import artifacts, storage
from sectune.config import API_GROUP, API_VERSION, DNS_LABEL_PATTERN
from sectune.serving import traffic


class PromoteError(Exception):
    """The promotion cannot be made; the message says why and what to do."""


@dataclass(frozen=True)
class Candidate:
    """A stored version that passed its gates, verified against storage."""

    uri: str
    sha256: str
    job: str
    run: str


def verify(uri: str, sha256: str | None) -> Candidate:
    """The version at `uri` (a version, or a job prefix's current one), its manifest's digest
    checked against `sha256` when given, refused unless its gates passed."""
    try:
        version_uri, recorded = artifacts.locate_version(uri)
        expected = sha256 or recorded
        body, manifest = artifacts.read_manifest(version_uri, expected)
    except (artifacts.IntegrityError, storage.StorageError) as exc:
        raise PromoteError(str(exc)) from None
    digest = hashlib.sha256(body).hexdigest()
    if manifest.gates_passed is not True:
        failing = manifest.failing_gates()
        raise PromoteError(
            f"{version_uri} did not pass its gates ({', '.join(failing) or 'no verdict'}); "
            "it cannot be promoted"
        )
    return Candidate(version_uri, digest, manifest.job, manifest.run)


def from_job(reference: str) -> Candidate:
    """The adapter a FineTuneJob (`namespace/name`) reports, verified against storage."""
    namespace, _, name = reference.partition("/")
    if not namespace or not name:
        raise PromoteError(f"--job {reference!r}: expected NAMESPACE/NAME")
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    try:
        config.load_kube_config()
    except (config.ConfigException, OSError):
        try:
            config.load_incluster_config()
        except config.ConfigException:
            raise PromoteError(
                "--job needs a cluster: no kubeconfig found ($KUBECONFIG or ~/.kube/config) "
                "and not running in a pod; or promote a stored version with --version URI"
            ) from None
    try:
        job = client.CustomObjectsApi().get_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, "finetunejobs", name
        )
    except ApiException as exc:
        raise PromoteError(f"FineTuneJob {reference}: {exc.status} {exc.reason}") from None
    status = job.get("status") or {}
    adapter = status.get("adapter") or {}
    if status.get("phase") != "Succeeded" or not adapter.get("uri") or not adapter.get("sha256"):
        raise PromoteError(
            f"FineTuneJob {reference} is {status.get('phase') or 'Pending'} "
            f"({status.get('gatesSummary') or 'no gates verdict'}); only a Succeeded job whose "
            "gates passed can be promoted"
        )
    return verify(adapter["uri"], adapter["sha256"])


# --------------------------------------------------------------------------- the YAML edit


def _yaml() -> YAML:
    yaml = YAML()  # round trip: comments, order, anchors, quotes kept
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _find(documents: list[Any], adapter: str, path: Path) -> Any:
    deployments = [
        d for d in documents if isinstance(d, dict) and d.get("kind") == "AdapterDeployment"
    ]
    if not deployments:
        raise PromoteError(f"{path}: no AdapterDeployment in the file")
    for deployment in deployments:
        for entry in (deployment.get("spec") or {}).get("adapters") or []:
            if entry.get("name") == adapter:
                return entry
    names = [
        e.get("name") for d in deployments for e in (d.get("spec") or {}).get("adapters") or []
    ]
    raise PromoteError(f"{path}: no adapter {adapter!r}; the file has {', '.join(map(str, names))}")


def _next_name(versions: list[Any]) -> str:
    numbers = [
        int(m.group(1)) for v in versions if (m := re.fullmatch(r"v(\d+)", str(v.get("version"))))
    ]
    return f"v{max(numbers, default=0) + 1}"


def _entry(name: str, candidate: Candidate) -> CommentedMap:
    source = CommentedMap([("uri", candidate.uri), ("sha256", candidate.sha256)])
    return CommentedMap([("version", name), ("source", source), ("traffic", 0)])


def edit(
    versions: list[Any],
    candidate: Candidate | None,
    name: str | None,
    canary: int | None,
    finalize: bool,
    rollback: bool,
) -> str:
    """Change an adapter's `versions` list in place (the rules of sectune.serving.traffic);
    returns what was done, in words."""
    try:
        if rollback:
            return traffic.rollback(versions)
        if finalize:
            return traffic.finalize(versions)
        assert candidate is not None
        in_traffic = [v for v in versions if traffic.share(v) > 0]
        if any((v.get("source") or {}).get("sha256") == candidate.sha256 for v in in_traffic):
            raise PromoteError(f"{candidate.uri} is already in traffic")
        name = name or _next_name(versions)
        if not re.fullmatch(DNS_LABEL_PATTERN, name) or name in map(traffic.name, versions):
            raise PromoteError(f"--name {name!r}: a new DNS-label version name is needed")
        if canary is not None:
            return traffic.add_canary(versions, _entry(name, candidate), canary)
        return traffic.promote(versions, _entry(name, candidate))
    except traffic.TrafficError as exc:
        raise PromoteError(str(exc)) from None


def promote(
    path: Path,
    adapter: str,
    candidate: Candidate | None,
    name: str | None = None,
    canary: int | None = None,
    finalize: bool = False,
    rollback: bool = False,
) -> tuple[str, str]:
    """Edit the file; returns (what was done, unified diff). The file changes only on success."""
    if sum((candidate is not None, finalize, rollback)) != 1:
        raise PromoteError(
            "give a version to promote (--job or --version), or --finalize, or --rollback"
        )
    if path.is_symlink():
        raise PromoteError(
            f"{path}: is a symbolic link; promote edits only regular files in the working tree"
        )
    try:
        before = path.read_text()
    except OSError as exc:
        raise PromoteError(f"{path}: {exc.strerror}") from None
    yaml = _yaml()
    try:
        documents = list(yaml.load_all(before))
    except Exception as exc:  # ruamel raises several parser errors
        raise PromoteError(f"{path}: not valid YAML: {exc}") from None
    entry = _find(documents, adapter, path)
    versions = entry.get("versions")
    if not versions:
        raise PromoteError(f"{path}: adapter {adapter!r} has no versions")
    done = edit(versions, candidate, name, canary, finalize, rollback)
    from sectune.serving.config import check_versions

    try:
        check_versions(adapter, [(traffic.name(v), traffic.share(v)) for v in versions])
    except ValueError as exc:
        raise PromoteError(f"{path}: {exc}") from None
    buffer = io.StringIO()
    yaml.dump_all(documents, buffer)
    after = buffer.getvalue()
    diff = "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile=f"a/{path}",
            tofile=f"b/{path}",
        )
    )
    from sectune.storage import StorageError, replace_file

    try:
        replace_file(path, after.encode())
    except (StorageError, OSError) as exc:
        raise PromoteError(f"{path}: not written: {exc}") from None
    return done, diff
