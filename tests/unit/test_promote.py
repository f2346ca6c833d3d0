"""`sectune promote`: minimal, comment-preserving edits of real-world AdapterDeployment YAML, and
refusals that leave the file byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from sectune import artifacts, storage
from sectune.promote import Candidate, PromoteError, promote, verify
from sectune.yamlio import load_yaml_all
from support.manifests import adapter_manifest

FILE = """\
# SOC models, promoted through pull requests.
apiVersion: v1
kind: Secret
metadata: {name: soc-keys}
stringData:
  api-keys: "# managed elsewhere"
---
apiVersion: sectune.io/v1alpha1
kind: AdapterDeployment
metadata:
  name: soc-models
spec:
  baseModel:
    uri: s3://models/SmolLM2-135M-Instruct   # pinned by the platform team
  adapters:
    - name: alert-triage
      versions:
        - version: v1
          source: &first
            uri: s3://adapters/soc/alert-triage/versions/r1
            sha256: 1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a
          traffic: 100   # stable
    - name: attack-tactics
      versions:
        - version: v1
          source: *first
  replicas: 2
"""

NEW = Candidate(
    "s3://adapters/soc/alert-triage/versions/r2", "2b" * 32, job="alert-triage", run="r2"
)
NEWER = Candidate(
    "s3://adapters/soc/alert-triage/versions/r3", "3c" * 32, job="alert-triage", run="r3"
)


def _versions(path: Path, adapter: str = "alert-triage") -> dict[str, int]:
    [deployment] = [d for d in load_yaml_all(path.read_text()) if d["kind"] == "AdapterDeployment"]
    [entry] = [a for a in deployment["spec"]["adapters"] if a["name"] == adapter]
    return {v["version"]: v.get("traffic", 100) for v in entry["versions"]}


def test_canary_finalize_promote_and_rollback_edit_only_what_they_must(tmp_path: Path):
    path = tmp_path / "soc.yaml"
    path.write_text(FILE)

    done, diff = promote(path, "alert-triage", NEW, canary=10)
    assert done == "canary: v2 at 10 %, v1 at 90 %"
    assert _versions(path) == {"v1": 90, "v2": 10}
    changed = [
        line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]
    assert changed == [
        "-          traffic: 100   # stable",
        "+          traffic: 90    # stable",
        "+        - version: v2",
        "+          source:",
        "+            uri: s3://adapters/soc/alert-triage/versions/r2",
        "+            sha256: " + "2b" * 32,
        "+          traffic: 10",
    ]
    text = path.read_text()
    assert "# pinned by the platform team" in text and "source: *first" in text
    assert text.startswith("# SOC models, promoted through pull requests.\napiVersion: v1")

    done, _ = promote(path, "alert-triage", None, finalize=True)
    assert done == "finalized: v2 at 100 %, dropped v1"
    assert _versions(path) == {"v2": 100}
    assert _versions(path, "attack-tactics") == {"v1": 100}  # the anchor's other user survives
    assert "uri: s3://adapters/soc/alert-triage/versions/r1" in path.read_text()

    done, _ = promote(path, "alert-triage", NEWER)
    assert done == "promoted: v3 at 100 %, v2 kept at 0 % for --rollback"
    assert _versions(path) == {"v2": 0, "v3": 100}

    done, _ = promote(path, "alert-triage", None, rollback=True)
    assert done == "rolled back: v2 at 100 %, dropped v3"
    assert _versions(path) == {"v2": 100}


@pytest.mark.parametrize(
    ("content", "arguments", "message"),
    [
        (
            FILE,
            {"adapter": "nope", "candidate": NEW},
            "no adapter 'nope'; the file has alert-triage, attack-tactics",
        ),
        ("kind: ConfigMap\n", {"candidate": NEW}, "no AdapterDeployment in the file"),
        (FILE, {"candidate": NEW, "canary": 100}, "between 1 and 99"),
        (FILE, {"candidate": None, "rollback": True}, "nothing to roll back to"),
        (FILE, {"candidate": None, "finalize": True}, "nothing to finalize"),
        (FILE, {"candidate": NEW, "name": "v1"}, "a new DNS-label version name"),
        (FILE, {"candidate": NEW, "name": "V_2"}, "a new DNS-label version name"),
        (FILE.replace("1a" * 32, "2b" * 32), {"candidate": NEW}, "already in traffic"),
        ("kind: [unclosed\n", {"candidate": NEW}, "not valid YAML"),
    ],
)
def test_refusals_leave_the_file_byte_identical(
    tmp_path: Path, content: str, arguments: dict, message: str
):  # type: ignore[type-arg]
    path = tmp_path / "soc.yaml"
    path.write_bytes(content.encode())
    adapter = arguments.pop("adapter", "alert-triage")
    with pytest.raises(PromoteError, match=message.replace("(", r"\(").replace(")", r"\)")):
        promote(path, adapter, **arguments)
    assert path.read_bytes() == content.encode()
    assert [p.name for p in tmp_path.iterdir()] == ["soc.yaml"]


def test_a_planted_symlink_beside_the_file_is_never_written_through(tmp_path: Path):
    """A repository that commits the old temporary name as a link to a shell rc file."""
    rc = tmp_path / "bashrc"
    rc.write_text("export PATH=/usr/bin\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    path = repo / "soc.yaml"
    path.write_text(FILE)
    (repo / ".soc.yaml.promote").symlink_to(rc)

    promote(path, "alert-triage", NEW, canary=10)

    assert rc.read_text() == "export PATH=/usr/bin\n"
    assert _versions(path) == {"v1": 90, "v2": 10}
    assert sorted(p.name for p in repo.iterdir()) == [".soc.yaml.promote", "soc.yaml"]


def test_a_symlinked_target_is_refused_and_its_target_untouched(tmp_path: Path):
    real = tmp_path / "elsewhere.yaml"
    real.write_text(FILE)
    link = tmp_path / "soc.yaml"
    link.symlink_to(real)
    with pytest.raises(PromoteError, match="is a symbolic link"):
        promote(link, "alert-triage", NEW, canary=10)
    assert real.read_text() == FILE and link.is_symlink()


def test_a_second_canary_is_refused(tmp_path: Path):
    path = tmp_path / "soc.yaml"
    path.write_text(FILE)
    promote(path, "alert-triage", NEW, canary=10)
    before = path.read_bytes()
    with pytest.raises(PromoteError, match=r"a canary is already in traffic \(v2 10 %\)"):
        promote(path, "alert-triage", NEWER, canary=20)
    assert path.read_bytes() == before


def _publish(tmp_path: Path, gates_passed: bool) -> artifacts.Published:
    stage = tmp_path / f"stage-{gates_passed}"
    (stage / "adapter").mkdir(parents=True)
    (stage / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    prefix = storage.parse_uri(f"file://{tmp_path}/store/triage")
    manifest = adapter_manifest(
        "triage",
        f"r-{gates_passed}",
        gates_passed=gates_passed,
        gates=[{"name": "macroF1>=0.8", "passed": gates_passed}],
    )
    return artifacts.publish(
        stage, prefix, f"r-{gates_passed}".lower(), manifest, make_current=gates_passed
    )


def test_verify_checks_the_stored_digest_and_the_gates(tmp_path: Path):
    passed = _publish(tmp_path, True)
    candidate = verify(passed.uri, passed.manifest_sha256)
    assert (candidate.uri, candidate.sha256, candidate.run) == (
        passed.uri,
        passed.manifest_sha256,
        "r-True",
    )
    assert verify(f"file://{tmp_path}/store/triage", None).sha256 == passed.manifest_sha256
    with pytest.raises(PromoteError, match="sha256"):
        verify(passed.uri, "f" * 64)
    failed = _publish(tmp_path, False)
    with pytest.raises(PromoteError, match=r"did not pass its gates \(macroF1>=0.8\)"):
        verify(failed.uri, failed.manifest_sha256)


def test_the_cli_promotes_a_stored_version_into_the_gitops_example(tmp_path: Path):
    import shutil
    import subprocess
    import sys

    example = (
        Path(__file__).resolve().parents[2]
        / "examples"
        / "gitops"
        / "deployments"
        / "soc-models.yaml"
    )
    target = tmp_path / "soc-models.yaml"
    shutil.copy(example, target)
    published = _publish(tmp_path, True)
    prefix = f"file://{tmp_path}/store/triage"
    command = [
        sys.executable,
        "-m",
        "sectune.cli",
        "promote",
        "--version",
        prefix,
        "--to",
        str(target),
    ]
    result = subprocess.run(
        [*command, "--adapter", "alert-triage", "--canary", "10"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert f"+            sha256: {published.manifest_sha256}" in result.stdout
    assert "canary: v2 at 10 %, v1 at 90 %" in result.stdout + result.stderr
    assert _versions(target) == {"v1": 90, "v2": 10}
    refused = subprocess.run(
        [*command, "--adapter", "attack-tactics"], capture_output=True, text=True
    )
    assert (
        refused.returncode == 2 and "no adapter 'attack-tactics'" in refused.stdout + refused.stderr
    )


def test_promote_from_a_job_without_a_cluster_says_what_to_do(tmp_path: Path, monkeypatch):
    from sectune.promote import from_job

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(PromoteError, match="--job needs a cluster: no kubeconfig found"):
        from_job("soc/triage")
