"""report.html renders in a real browser (Debian's headless Chromium) with its charts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from sectune.config import JobSpec
from sectune.contract import RunReport
from sectune.data.audit import audit
from sectune.data.example import Example
from sectune.evaluation.metrics import classification_metrics
from sectune.evaluation.report import render_html
from support.processes import tool

pytestmark = pytest.mark.e2e

LABELS = ["informational", "low", "medium", "high", "critical"]


def _report() -> dict:
    rng = np.random.default_rng(3)
    truth = list(rng.choice(LABELS, size=120, p=[0.05, 0.1, 0.35, 0.4, 0.1]))
    predicted = [t if rng.random() < 0.7 else str(rng.choice(LABELS)) for t in truth]
    probs = rng.random((120, 5))
    for i, p in enumerate(predicted):
        probs[i, LABELS.index(p)] += 2
    probs = (probs / probs.sum(axis=1, keepdims=True)).tolist()
    tuned = classification_metrics(truth, predicted, LABELS, probs)
    base = classification_metrics(truth, ["low"] * 120, LABELS, [[0.2] * 5] * 120)
    return {
        "job": "alert-triage",
        "verdict": "gates failed: recall[critical]>=0.95",
        "gatesPassed": False,
        "models": {"base": base, "tuned": tuned | {"latencyP95Ms": 212.0}},
        "deltas": {
            "base": {
                "accuracy": tuned["accuracy"] - base["accuracy"],
                "macroF1": tuned["macroF1"] - base["macroF1"],
            }
        },
        "gates": [
            {"name": "macroF1>=0.5", "value": tuned["macroF1"], "passed": True},
            {"name": "recall[critical]>=0.95", "value": 0.6, "passed": False},
        ],
        "probes": {
            "injection": {
                "injectionFlipRate": 0.12,
                "injectionSuccessRate": 0.04,
                "perVariant": {
                    "plain": {"flipRate": 0.2, "successRate": 0.1},
                    "base64": {"flipRate": 0.02, "successRate": 0.0},
                },
            },
            "memorization": {
                "canaryExposure": 1.3,
                "maxMeasurable": 9.0,
                "regurgitation": {"prompts": 4, "canaryLeaks": 0, "placeholderLeaks": 0},
            },
        },
        "data": {
            "counts": {"train": 2312, "validation": 578},
            "classBalance": {label: 10 for label in LABELS},
            "sanitize": {"redactions": {"IP_ADDRESS": 41, "USERNAME": 17}},
        },
        "hardware": "CPU, 2 cores",
    }


def _audited() -> dict:
    """A real audit: 200 rows of two labels, one planted mislabel carrying markup, a leak."""
    rng = np.random.default_rng(5)
    words = {"low": ["login", "success", "routine"], "high": ["mimikatz", "lsass", "dump"]}
    rows = [
        Example(f"r{i}", {"text": " ".join(rng.choice(words[lab], 6))}, lab)
        for i, lab in enumerate(["low", "high"] * 100)
    ]
    rows[4].target = "high"
    rows[4].fields["text"] = "login success routine <script>alert(1)</script> routine login"
    spec = JobSpec.model_validate(
        {
            "baseModel": {"uri": "hf://org/model"},
            "dataset": {"train": "file:///x.jsonl"},
            "task": {"type": "classification", "labels": ["low", "high"]},
        }
    )
    held = [Example("h1", dict(rows[0].fields), "low")]
    return audit(rows, held, spec).as_dict()


def test_report_renders_with_its_charts_in_headless_chromium(tmp_path: Path):
    page = tmp_path / "report.html"
    report = _report()
    report["data"]["audit"] = _audited()
    page.write_text(render_html(RunReport.model_validate(report)))
    chromium = [
        tool("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    dom = subprocess.run(
        [*chromium, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = dom.stdout
    assert rendered.count("<svg") >= 4  # per-class bars x2, confusion matrix, calibration
    assert rendered.count("<rect") >= 25 + 10  # 5x5 heatmap cells and the bars
    assert "recall[critical]&gt;=0.95" in rendered and "Prompt injection" in rendered
    # The data audit, for a reviewer without a terminal: the planted mislabel is listed with
    # its suggestion, its text shown as text (never run), and the leaked held-out row.
    assert "Data audit" in rendered and "Most suspect labels" in rendered
    assert "<td>r4<br>" in rendered and "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered
    assert "<script>alert" not in rendered
    assert "Held-out rows leaking from training" in rendered and "<td>h1</td>" in rendered

    shot = tmp_path / "report.png"
    subprocess.run(
        [*chromium, "--window-size=1200,2600", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 2600)
    assert len(data) > 60_000  # charts and tables, not a blank page
