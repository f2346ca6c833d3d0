"""report.json and a self-contained report.html (inline SVG and CSS, no external assets)."""

from __future__ import annotations

import html
from typing import Any

from sectune.config import GateMetric
from sectune.contract import RunReport

HEADLINE: tuple[GateMetric, ...] = (
    "accuracy",
    "macroF1",
    "weightedF1",
    "rocAuc",
    "expectedCalibrationError",
    "formatCompliance",
    "schemaCompliance",
    "fieldF1",
    "exactMatch",
    "referenceOverlapF1",
    "validationLoss",
    "latencyP95Ms",
    "throughputPerSecond",
    "consistency",
    "injectionFlipRate",
    "canaryExposure",
)
"""The metrics a report shows, in this order (typed: each is a metric a gate may name)."""


def headline_rows(report: RunReport) -> list[tuple[str, dict[str, float | None]]]:
    """(metric, {model: value}) for the metrics every model in the report has or could have."""
    models = report.models
    rows: list[tuple[str, dict[str, float | None]]] = []
    for metric in HEADLINE:
        values = {name: m.get(metric) for name, m in models.items()}
        if any(v is not None for v in values.values()):
            rows.append((metric, values))
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return html.escape(str(value))


def _bars(per_class: dict[str, dict[str, float]], metric: str) -> str:
    width, row = 520, 22
    labels = list(per_class)
    svg = [
        f'<svg width="{width}" height="{row * len(labels) + 10}" role="img" aria-label="per-class {metric}">'
    ]
    for i, label in enumerate(labels):
        value = per_class[label].get(metric, 0.0)
        y = 5 + i * row
        svg.append(f'<text x="0" y="{y + 15}" font-size="12">{html.escape(label[:28])}</text>')
        svg.append(
            f'<rect x="190" y="{y + 3}" width="{value * 280:.1f}" height="15" fill="#3b82f6"/>'
        )
        svg.append(
            f'<text x="{195 + value * 280:.1f}" y="{y + 15}" font-size="11">{value:.2f}</text>'
        )
    svg.append("</svg>")
    return "".join(svg)


def _heatmap(confusion: dict[str, Any]) -> str:
    labels, matrix = confusion["labels"], confusion["matrix"]
    cell = 34
    pad = 170
    peak = max((max(r) for r in matrix), default=1) or 1
    size = pad + cell * len(labels)
    svg = [
        f'<svg width="{size + 10}" height="{size + 10}" role="img" aria-label="confusion matrix">'
    ]
    for i, label in enumerate(labels):
        svg.append(
            f'<text x="0" y="{pad + i * cell + 21}" font-size="11">{html.escape(label[:24])}</text>'
        )
        svg.append(
            f'<text x="{pad + i * cell + 12}" y="{pad - 6}" font-size="11" '
            f'transform="rotate(-60 {pad + i * cell + 12} {pad - 6})">{html.escape(label[:24])}</text>'
        )
        for j, count in enumerate(matrix[i]):
            shade = int(255 - 200 * count / peak)
            svg.append(
                f'<rect x="{pad + j * cell}" y="{pad + i * cell}" width="{cell - 2}" height="{cell - 2}" '
                f'fill="rgb({shade},{shade},255)"><title>{html.escape(label)} → {html.escape(labels[j])}: {count}</title></rect>'
            )
            if count:
                svg.append(
                    f'<text x="{pad + j * cell + 8}" y="{pad + i * cell + 21}" font-size="11">{count}</text>'
                )
    svg.append("</svg>")
    return "".join(svg)


def _calibration(bins: list[dict[str, float]]) -> str:
    size = 240
    svg = [f'<svg width="{size + 40}" height="{size + 30}" role="img" aria-label="calibration">']
    svg.append(
        f'<line x1="30" y1="{size}" x2="{size + 30}" y2="0" stroke="#999" stroke-dasharray="4"/>'
    )
    svg.append(f'<rect x="30" y="0" width="{size}" height="{size}" fill="none" stroke="#ccc"/>')
    points = " ".join(
        f"{30 + b['confidence'] * size:.1f},{size - b['accuracy'] * size:.1f}" for b in bins
    )
    svg.append(f'<polyline points="{points}" fill="none" stroke="#ef4444" stroke-width="2"/>')
    for b in bins:
        svg.append(
            f'<circle cx="{30 + b["confidence"] * size:.1f}" cy="{size - b["accuracy"] * size:.1f}" r="3" fill="#ef4444"/>'
        )
    svg.append(
        f'<text x="30" y="{size + 20}" font-size="11">confidence → (accuracy ↑)</text></svg>'
    )
    return "".join(svg)


def _probes_html(probes: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    injection = probes.get("injection")
    if injection:
        parts.append(
            "<h2>Prompt injection</h2><p>Instructions planted in the untrusted field of held-out "
            f"examples. Flip rate {_fmt(injection['injectionFlipRate'])}, attack success rate "
            f"{_fmt(injection['injectionSuccessRate'])}.</p>"
            "<table><tr><th>variant</th><th>flip rate</th><th>success rate</th></tr>"
        )
        for variant, rates in injection.get("perVariant", {}).items():
            parts.append(
                f"<tr><td>{html.escape(variant)}</td><td>{_fmt(rates['flipRate'])}</td><td>{_fmt(rates['successRate'])}</td></tr>"
            )
        parts.append("</table>")
    memorization = probes.get("memorization")
    if memorization:
        leaks = memorization.get("regurgitation", {})
        parts.append(
            "<h2>Memorization</h2><table>"
            f"<tr><td>canary exposure (mean, bits)</td><td>{_fmt(memorization['canaryExposure'])}</td></tr>"
            f"<tr><td>highest single canary (bits)</td><td>{_fmt(memorization.get('maxExposure'))}</td></tr>"
            f"<tr><td>range: chance … measurable up to (bits)</td><td>{_fmt(memorization.get('chance'))} … {_fmt(memorization['maxMeasurable'])}</td></tr>"
            f"<tr><td>measures</td><td>{html.escape(str(memorization.get('measures', '')))}</td></tr>"
            f"<tr><td>canary leaks in greedy continuations</td><td>{_fmt(leaks.get('canaryLeaks'))} / {_fmt(leaks.get('prompts'))}</td></tr>"
            f"<tr><td>redaction placeholders in continuations</td><td>{_fmt(leaks.get('placeholderLeaks'))}</td></tr></table>"
        )
    return parts


def _audit_html(audit: dict[str, Any], tuned: dict[str, Any]) -> list[str]:
    """The data audit for a reviewer: label distribution, what was flagged, leakage."""
    parts = ["<h2>Data audit</h2><table>"]
    errors = audit.get("labelErrorsTotal")
    rows = [
        ("suspected label errors", "not measured" if errors is None else errors, "trainRows"),
        ("near-duplicates in training", audit.get("nearDuplicatesTotal", 0), "trainRows"),
        ("conflicting labels", audit.get("conflictsTotal", 0), "trainRows"),
        ("held-out rows leaking from training", audit.get("leakedTotal", 0), "heldOutRows"),
    ]
    for name, count, of in rows:
        parts.append(f"<tr><td>{name}</td><td>{_fmt(count)} of {_fmt(audit.get(of))}</td></tr>")
    if "macroF1WithoutLeaked" in tuned:
        parts.append(
            f"<tr><td>tuned macro-F1 without the leaked rows</td><td>"
            f"{_fmt(tuned['macroF1WithoutLeaked'])} on {tuned['rowsWithoutLeaked']} rows (all "
            f"rows: {_fmt(tuned.get('macroF1'))})</td></tr>"
        )
    coverage = audit.get("coverage", {})
    cut = coverage.get("truncation")
    if cut:
        parts.append(
            f"<tr><td>rows cut by maxSeqLength {cut['maxSeqLength']}</td><td>{cut['rowsCut']} "
            f"({cut['shareCut']:.1%}); of those, a median {cut['medianShareLost']:.0%} of the "
            "prompt unseen</td></tr>"
        )
    if coverage.get("lengthShift") is not None:
        parts.append(
            f"<tr><td>length shift, training against held-out (KS)</td>"
            f"<td>{_fmt(coverage['lengthShift'])}</td></tr>"
        )
    parts.append(f"<tr><td>method</td><td>{_fmt(audit.get('method'))}</td></tr></table>")
    labels = coverage.get("labels") or {}
    if labels:
        under = set(coverage.get("labelsUnderMinimum", []))
        parts.append(
            "<h3>Label distribution</h3><table><tr><th>label</th><th>training</th>"
            "<th>held-out</th></tr>"
        )
        for label, counts in labels.items():
            mark = " (under the minimum)" if label in under else ""
            parts.append(
                f"<tr><td>{_fmt(label)}{mark}</td><td>{counts['train']}</td>"
                f"<td>{counts['heldOut']}</td></tr>"
            )
        parts.append("</table>")
    issues = audit.get("labelErrors") or []
    if issues:
        parts.append(
            f"<h3>Most suspect labels ({min(len(issues), 50)} of {errors})</h3><table><tr>"
            "<th>row</th><th>given</th><th>suggested</th><th>confidence</th><th>text "
            "(sanitized)</th></tr>"
        )
        for issue in issues[:50]:
            parts.append(
                f"<tr><td>{_fmt(issue['id'])}<br><small>{_fmt(issue.get('where', ''))}</small>"
                f"</td><td>{_fmt(issue['given'])}</td><td>{_fmt(issue['suggested'])}</td>"
                f"<td>{_fmt(issue['confidence'])}</td><td>{_fmt(issue.get('text', ''))}</td></tr>"
            )
        parts.append("</table>")
    for key, title in (
        ("leaked", "Held-out rows leaking from training"),
        ("conflicts", "Conflicting labels"),
    ):
        pairs = audit.get(key) or []
        if pairs:
            parts.append(
                f"<h3>{title}</h3><table><tr><th>row</th><th>near</th><th>similarity</th></tr>"
            )
            for pair in pairs[:50]:
                parts.append(
                    f"<tr><td>{_fmt(pair['id'])}</td><td>{_fmt(pair['other'])}</td>"
                    f"<td>{_fmt(pair['similarity'])}</td></tr>"
                )
            parts.append("</table>")
    return parts


def _decision_html(tuned: dict[str, Any]) -> list[str]:
    """The recall-target rule (task.recallTargets): each target label, argmax against the
    cross-fitted rule, and what it cost overall."""
    decided = tuned.get("decision")
    if not decided:
        return []
    crossed, rule = decided["crossFitted"], decided["rule"]
    parts = [
        "<h2>Recall targets (cross-fitted: each half decided by the rule fitted on the other)"
        "</h2><table><tr><th>label</th><th>target</th><th>threshold</th>"
        "<th>argmax recall / precision</th><th>rule recall / precision</th></tr>"
    ]
    for label, target in decided["recallTargets"].items():
        argmax = tuned.get("perClass", {}).get(label, {})
        ruled = crossed["perClass"].get(label, {})
        parts.append(
            f"<tr><td>{html.escape(label)}</td><td>{_fmt(target)}</td>"
            f"<td>{_fmt(rule['thresholds'].get(label))}</td>"
            f"<td>{_fmt(argmax.get('recall'))} / {_fmt(argmax.get('precision'))}</td>"
            f"<td>{_fmt(ruled.get('recall'))} / {_fmt(ruled.get('precision'))}</td></tr>"
        )
    parts.append(
        f"<tr><td>accuracy, macro-F1</td><td></td><td></td>"
        f"<td>{_fmt(tuned.get('accuracy'))}, {_fmt(tuned.get('macroF1'))}</td>"
        f"<td>{_fmt(crossed['accuracy'])}, {_fmt(crossed['macroF1'])}</td></tr></table>"
    )
    return parts


def _verdicts_html(verdicts: dict[str, Any] | None) -> list[str]:
    """The newest analysts' verdicts held out from training (dataset.feedback.holdOut)."""
    if not verdicts:
        return []
    names = [n for n in ("tuned", "previous") if n in verdicts]
    parts = [
        f"<h2>On the newest analysts' verdicts ({verdicts.get('rows', 0)} rows, never trained on)"
        "</h2><table><tr><th>metric</th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"
    ]
    for metric in ("accuracy", "macroF1"):
        parts.append(
            f"<tr><td>{metric}</td>"
            + "".join(f"<td>{_fmt(verdicts[n].get(metric))}</td>" for n in names)
            + "</tr>"
        )
    parts.append("</table>")
    return parts


def _constrained_html(tuned: dict[str, Any]) -> list[str]:
    """An extraction adapter's answers free and held to its schema while decoding (as served)."""
    held = tuned.get("constrained")
    if not held:
        return []
    parts = [
        "<h2>Free and held to the output schema while decoding (as served)</h2>"
        "<table><tr><th>metric</th><th>free</th><th>held to the schema</th></tr>"
    ]
    for metric in ("formatCompliance", "schemaCompliance", "fieldF1", "exactMatch"):
        parts.append(
            f"<tr><td>{metric}</td><td>{_fmt(tuned.get(metric))}</td>"
            f"<td>{_fmt(held.get(metric))}</td></tr>"
        )
    parts.append("</table>")
    return parts


def render_html(report: RunReport) -> str:
    models = report.models
    tuned = models.get("tuned", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>sectune report: {html.escape(report.job or '')}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}.pass{color:#15803d}.fail{color:#b91c1c;font-weight:bold}"
        ".grid{display:flex;flex-wrap:wrap;gap:2em}</style></head><body>",
        f"<h1>{html.escape(report.job or 'sectune job')}</h1>",
        f"<p>Verdict: <b class='{'pass' if report.gates_passed else 'fail'}'>"
        f"{html.escape(report.verdict)}</b></p>",
        "<h2>Headline</h2><table><tr><th>metric</th>",
    ]
    parts += [f"<th>{html.escape(name)}</th>" for name in models]
    parts.append("</tr>")
    for metric, values in headline_rows(report):
        parts.append(
            f"<tr><td>{metric}</td>"
            + "".join(f"<td>{_fmt(values[n])}</td>" for n in models)
            + "</tr>"
        )
    parts.append("</table>")
    if report.gates:
        parts.append("<h2>Gates</h2><table><tr><th>gate</th><th>value</th><th>result</th></tr>")
        for gate in report.gates:
            css = "pass" if gate.passed else "fail"
            parts.append(
                f"<tr><td>{html.escape(gate.name)}</td><td>{_fmt(gate.value)}</td>"
                f"<td class='{css}'>{'pass' if gate.passed else 'FAIL'} {html.escape(gate.reason)}</td></tr>"
            )
        parts.append("</table>")
    if report.worth_it:
        parts.append(f"<p><strong>{html.escape(report.worth_it)}</strong></p>")
    if report.baselines_from:
        parts.append(f"<p><small>Baselines: {html.escape(report.baselines_from)}.</small></p>")
    parts += _decision_html(tuned)
    parts += _verdicts_html(report.verdicts)
    parts += _probes_html(report.probes)
    if report.deltas:
        parts.append(
            "<h2>Tuned minus each baseline</h2><table><tr><th>baseline</th><th>metric</th><th>delta</th></tr>"
        )
        for base, deltas in report.deltas.items():
            for metric, delta in deltas.items():
                css = "pass" if (delta > 0) != (metric == "validationLoss") else "fail"
                parts.append(
                    f"<tr><td>{html.escape(base)}</td><td>{metric}</td><td class='{css}'>{delta:+.3f}</td></tr>"
                )
        parts.append("</table>")
    if report.consistency:
        parts.append(
            f"<h2>Served ({html.escape(report.endpoint or '')}) against training time</h2>"
            "<table><tr><th>metric</th><th>training</th><th>served</th><th>difference</th></tr>"
        )
        for metric, row in report.consistency.items():
            parts.append(
                f"<tr><td>{metric}</td><td>{_fmt(row['training'])}</td><td>{_fmt(row['served'])}</td>"
                f"<td>{row['delta']:+.3f}</td></tr>"
            )
        parts.append("</table>")
    parts += _constrained_html(tuned)
    if tuned.get("perClass"):
        parts.append("<div class='grid'><div><h2>Per-class F1 (tuned)</h2>")
        parts.append(_bars(tuned["perClass"], "f1"))
        parts.append("</div><div><h2>Per-class recall (tuned)</h2>")
        parts.append(_bars(tuned["perClass"], "recall"))
        parts.append("</div></div>")
    if tuned.get("confusionMatrix"):
        parts.append("<div class='grid'><div><h2>Confusion matrix (tuned; rows: truth)</h2>")
        parts.append(_heatmap(tuned["confusionMatrix"]))
        parts.append("</div>")
        if tuned.get("calibration"):
            parts.append(
                "<div><h2>Calibration (tuned)</h2>" + _calibration(tuned["calibration"]) + "</div>"
            )
        parts.append("</div>")
    data = report.data
    if data is not None:
        parts.append("<h2>Data</h2><table>")
        for key, table in (
            ("counts", data.counts),
            ("classBalance", data.class_balance),
            ("deduplicated", data.deduplicated),
        ):
            if table:
                parts.append(
                    f"<tr><td>{key}</td><td>{_fmt(', '.join(f'{k}: {v}' for k, v in table.items()))}</td></tr>"
                )
        redactions = data.redactions
        parts.append(
            f"<tr><td>redactions</td><td>{_fmt(', '.join(f'{k}: {v}' for k, v in redactions.items()) or 'none')}</td></tr>"
        )
        parts.append("</table>")
        if data.audit:
            parts += _audit_html(data.audit, tuned)
    parts.append(
        f"<p><small>Hardware: {html.escape(report.hardware or '')}</small></p></body></html>"
    )
    return "".join(parts)
