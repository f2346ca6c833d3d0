"""`sectune`: run a FineTuneJob on this machine, train in a pod, evaluate, serve, check data,
fetch models."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from sectune import __version__, contract
from sectune.config import JobSpec, ManifestError, load_manifest
from sectune.contract import DataReport, ExitCode, RunReport, TrainerResult, TrainingProgress
from sectune.placement import INFERENCE_PRECISIONS
from sectune.progress import listening

console = Console(stderr=True)
if not console.is_terminal:  # logs and CI: room for the summary table's columns
    console.width = 132


def _summary_table(report: RunReport) -> Table:
    from sectune.evaluation.report import headline_rows

    models = list(report.models)
    table = Table(title=f"{report.job}: {report.verdict}")
    table.add_column("metric")
    for name in models:
        table.add_column(name, justify="right")
    for metric, values in headline_rows(report):
        table.add_row(metric, *("–" if values[n] is None else f"{values[n]:.3f}" for n in models))
    tuned_column = models.index("tuned") if "tuned" in models else len(models) - 1
    for gate in report.gates:
        cells = [""] * len(models)
        value = "–" if gate.value is None else f"{gate.value:.3f}"
        cells[tuned_column] = f"{value} {'pass' if gate.passed else 'FAIL'}"
        table.add_row(f"gate {gate.name}", *cells)
    for metric, row in report.consistency.items():
        cells = [""] * len(models)
        cells[tuned_column] = f"{row['delta']:+.3f}"
        table.add_row(f"served − training: {metric}", *cells)
    return table


def _write_result(path: Path, message: str) -> None:
    try:
        path.write_text(message[:4096])
    except OSError as exc:
        console.print(f"[yellow]warning:[/] could not write the result to {path}: {exc.strerror}")


class _ProgressBars:
    """Bars with counts and ETA for long evaluation stages (sectune.progress); a stage that took
    more than a few seconds leaves one line in the log."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.tasks: dict[str, tuple[Any, float]] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        import time

        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self.progress.start()
        if what not in self.tasks:
            self.tasks[what] = (self.progress.add_task(what, total=total), time.monotonic())
        task, began = self.tasks[what]
        self.progress.update(task, completed=done, total=total)
        if done >= total:
            self.progress.remove_task(task)
            del self.tasks[what]
            if time.monotonic() - began > 5:
                console.log(f"{what}: {total} in {time.monotonic() - began:.0f} s")
            if not self.tasks:
                self.progress.stop()
                self.progress = None


PLAIN_EVERY_SECONDS = 30.0
"""Off a terminal, how often a running stage or training prints a plain progress line."""


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class _PlainLines:
    """Progress off a terminal (`sectune run … > log`, `kubectl logs` of a training pod), where
    bars print nothing until they end: one plain line per stage when it starts, every
    `every` seconds, and when it ends, as the Hugging Face Trainer logs. Used for evaluation
    stages (sectune.progress) and training steps alike."""

    def __init__(self, every: float = PLAIN_EVERY_SECONDS) -> None:
        self.every = every
        self.began: dict[str, float] = {}
        self.printed: dict[str, float] = {}

    def __call__(self, what: str, done: int, total: int, extra: str = "") -> None:
        import time

        now = time.monotonic()
        began = self.began.setdefault(what, now)
        finished = done >= total
        if not finished and what in self.printed and now - self.printed[what] < self.every:
            return
        self.printed[what] = now
        elapsed = now - began
        line = f"{what}: {done}/{total}{extra}"
        if finished:
            line += f", done in {_duration(elapsed)}"
            self.began.pop(what)
            self.printed.pop(what)
        elif done and elapsed > 0:
            line += f", ETA {_duration((total - done) * elapsed / done)}"
        console.log(line)


def _run(name: str, spec: JobSpec, metrics_port: int | None, termination_path: Path | None) -> int:
    from sectune import runner
    from sectune.artifacts import IntegrityError
    from sectune.contract import ResultDataset
    from sectune.data.audit import DataQualityError
    from sectune.data.load import DataError
    from sectune.storage import StorageError
    from sectune.training.base_model import ModelError
    from sectune.training.distributed import RendezvousError
    from sectune.training.metrics import TrainingMetrics
    from sectune.training.train import Preempted

    # One metrics server per pod: the operator starts a process per GPU, and only the pod's
    # first (LOCAL_RANK 0) binds the port; every pod reports its own rank's view.
    pod_first = os.environ.get("LOCAL_RANK", "0") == "0"
    metrics = TrainingMetrics(metrics_port) if metrics_port and pod_first else None
    plain = None if console.is_terminal else _PlainLines()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task_id = None

    main_process = os.environ.get("RANK", "0") == "0"  # torchrun / accelerate set RANK

    def on_event(event: str, data: Any) -> None:
        if event == "step":
            on_step(data)
        elif not main_process:
            return
        elif event == "stage":
            console.log(data["name"])
        elif event == "data":  # a DataReport
            console.log(f"Data: {data.counts}; redactions: {data.redactions or 'none'}")
            for warning in data.warnings:
                console.log(f"[yellow]warning:[/] {warning}")

    def on_step(step: TrainingProgress) -> None:
        nonlocal task_id
        if metrics:
            metrics.update(step)
        if not main_process:
            return
        if plain is not None:
            plain(
                "training",
                step.step,
                step.total_steps,
                f", loss {step.loss:.3f}, {step.tokens_per_second:.0f} tok/s",
            )
            return
        if task_id is None:
            progress.start()
            task_id = progress.add_task("training", total=step.total_steps, loss="", speed="")
        progress.update(
            task_id,
            completed=step.step,
            loss=f"{step.loss:.3f}",
            speed=f"{step.tokens_per_second:.0f}",
        )
        if step.step == step.total_steps:
            progress.stop()

    def finish(code: int, message: str) -> int:
        if termination_path:
            _write_result(termination_path, message)
        return code

    try:
        listener = (plain or _ProgressBars()) if main_process else lambda *_: None
        with listening(listener):
            outcome = runner.run_job(name, spec, on_event)
    except DataQualityError as exc:
        progress.stop()
        console.print(f"[red]error:[/] {exc}")
        result = TrainerResult.failure("DataQualityFailed", str(exc))
        result.dataset = ResultDataset(quality=exc.audit.summary())
        return finish(ExitCode.BAD_INPUT, result.to_message())
    except (
        ManifestError,
        DataError,
        runner.ResourceError,
        ModelError,
        ValueError,
        IntegrityError,  # evaluation.previousVersion does not verify
    ) as exc:
        progress.stop()
        console.print(f"[red]error:[/] {exc}")
        return finish(
            ExitCode.BAD_INPUT,
            TrainerResult.failure("InvalidInput", str(exc)).to_message(),
        )
    except Preempted as exc:
        progress.stop()
        console.print(f"[yellow]{exc}[/]")
        return finish(
            ExitCode.PREEMPTED,
            TrainerResult.failure("Preempted", str(exc), phase="Training").to_message(),
        )
    except (StorageError, RendezvousError) as exc:  # infrastructure: the Job retries
        progress.stop()
        storage_failed = isinstance(exc, StorageError)
        console.print(f"[red]{'storage error' if storage_failed else 'error'}:[/] {exc}")
        reason = "StorageError" if storage_failed else "RendezvousTimeout"
        return finish(ExitCode.INFRASTRUCTURE, TrainerResult.failure(reason, str(exc)).to_message())
    finally:
        if metrics:
            metrics.stop()
    if outcome.report is None:  # a non-main process of a distributed run
        return ExitCode.OK
    console.print(_summary_table(outcome.report))
    console.print(f"Adapter: {outcome.adapter_uri}", soft_wrap=True)
    console.print(f"Digest:  sha256 {outcome.adapter_sha256} (manifest.json)", soft_wrap=True)
    console.print(f"Report:  {outcome.adapter_uri}/report.html", soft_wrap=True)
    if outcome.phase == "Succeeded" and outcome.adapter_uri:
        job_prefix = outcome.adapter_uri.rsplit("/versions/", 1)[0]
        console.print(f"Serve:   sectune serve --adapter {name}={job_prefix}", soft_wrap=True)
    code = ExitCode.OK if outcome.phase == "Succeeded" else ExitCode.GATES_FAILED
    return finish(code, outcome.result().to_message())


def cmd_run(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as exc:
        console.print(f"[red]error:[/] {exc}")
        return ExitCode.BAD_INPUT
    spec = manifest.spec
    if manifest.ignored_fields:
        console.log("Ignoring cluster-only fields locally: " + ", ".join(manifest.ignored_fields))
    updates: dict[str, Any] = {}
    if args.cpu:
        updates["resources"] = spec.resources.model_copy(
            update={"gpus": 0, "nodes": 1, "distributed": None}
        )
    if args.output:
        updates["output"] = spec.output.model_copy(update={"uri": args.output})
    spec = spec.model_copy(update=updates)
    return _run(manifest.name, spec, args.metrics_port, None)


def cmd_train(args: argparse.Namespace) -> int:
    """In the training pod: the operator's resolved config, metrics endpoint, termination message."""
    from pydantic import ValidationError

    termination = Path(args.termination_log)
    try:
        document = json.loads(Path(args.config).read_text())
        spec = JobSpec.model_validate(document["spec"])
        name = document["name"]
    except (OSError, KeyError, json.JSONDecodeError, ValidationError) as exc:
        console.print(f"[red]error:[/] {args.config}: {exc}")
        _write_result(
            termination,
            TrainerResult.failure("InvalidConfig", str(exc)).to_message(),
        )
        return ExitCode.BAD_INPUT
    return _run(name, spec, args.metrics_port, termination)


def _recall_targets(given: str | None) -> dict[str, float] | None:
    """`--recall-targets critical=0.95,high=0.9` (ValueError naming the bad item)."""
    if not given:
        return None
    targets = {}
    for item in given.split(","):
        label, sep, value = item.partition("=")
        try:
            targets[label.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not label.strip():
            raise ValueError(
                f"--recall-targets {item!r}: expected label=recall, e.g. critical=0.95"
            )
    return targets


def cmd_evaluate(args: argparse.Namespace) -> int:
    """A stored adapter on any data, against its gates or a gates file."""
    from sectune.artifacts import IntegrityError
    from sectune.data.load import DataError
    from sectune.evaluation.remote import EndpointError, evaluate_endpoint
    from sectune.evaluation.report import render_html
    from sectune.evaluation.suite import evaluate_stored
    from sectune.storage import StorageError

    try:
        if args.endpoint:
            if not args.model:
                console.print("[red]error:[/] --endpoint needs --model (name or name@version)")
                return ExitCode.BAD_INPUT
            api_key = (
                Path(args.api_key_file).read_text().strip()
                if args.api_key_file
                else os.environ.get("SECTUNE_API_KEY")
            )
            report = evaluate_endpoint(args.endpoint, args.model, args.data, args.gates, api_key)
        else:
            with listening(_ProgressBars()):
                report = evaluate_stored(
                    args.adapter,
                    args.data,
                    args.gates,
                    args.precision,
                    _baseline_names(args.baselines),
                    _recall_targets(args.recall_targets),
                )
    except (
        DataError,
        StorageError,
        IntegrityError,
        ManifestError,
        EndpointError,
        OSError,
        ValueError,
    ) as exc:
        console.print(f"[red]error:[/] {exc}")
        return ExitCode.BAD_INPUT
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(report.to_json())
    (out / "report.html").write_text(render_html(report))
    console.print(_summary_table(report))
    if report.baselines_from:
        console.print(f"Baselines: {report.baselines_from}", soft_wrap=True)
    if report.worth_it:
        console.print(f"Verdict: {report.worth_it}", soft_wrap=True)
    console.print(f"Report:  {out / 'report.html'}", soft_wrap=True)
    return ExitCode.OK if report.gates_passed else ExitCode.GATES_FAILED


def _baseline_names(value: str) -> tuple[str, ...]:
    from sectune.evaluation.suite import REMEASURABLE

    names = tuple(n.strip() for n in value.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in REMEASURABLE]
    if unknown:
        raise ValueError(
            f"--baselines {', '.join(unknown)}: choose from {', '.join(REMEASURABLE)} or none"
        )
    return names


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a base model with adapters from storage; hot-swap when the config changes."""
    from sectune.serving.config import config_from_flags, load_serving_config
    from sectune.serving.server import ServerOptions, serve

    if bool(args.config) == bool(args.adapter):
        console.print("[red]error:[/] give either --config FILE or one or more --adapter name=URI")
        return ExitCode.BAD_INPUT
    if args.config and args.feedback_store:
        console.print("[red]error:[/] with --config, set feedback.store in the config file")
        return ExitCode.BAD_INPUT
    try:
        config_path = Path(args.config) if args.config else None
        config = (
            load_serving_config(config_path)
            if config_path
            else config_from_flags(args.adapter, args.base_model, args.feedback_store)
        )
    except ManifestError as exc:
        console.print(f"[red]error:[/] {exc}")
        return ExitCode.BAD_INPUT
    if "SECTUNE_LOG_LEVEL" not in os.environ:  # loads, swaps and refusals are the server's news
        logging.getLogger("sectune.serving").setLevel(logging.INFO)
    _access_log_on_stdout(args.access_log)
    keys = args.api_keys_file or os.environ.get("SECTUNE_API_KEYS_FILE")
    if keys is not None and not keys.strip():  # set but empty: never read as "auth off"
        console.print(
            "[red]error:[/] SECTUNE_API_KEYS_FILE is set but empty; point it at the keys file, "
            "or unset it to serve without keys"
        )
        return ExitCode.BAD_INPUT
    token = args.metrics_token_file or os.environ.get("SECTUNE_METRICS_TOKEN_FILE") or None
    try:
        peers = _peers(args)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        return ExitCode.BAD_INPUT
    options = ServerOptions(
        config_path=config_path,
        config=config,
        api_keys_file=Path(keys) if keys else None,
        metrics_token_file=Path(token) if token else None,
        precision=args.precision,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        prefix_cache=args.prefix_cache,
        reload_interval=args.reload_interval,
        max_in_flight=args.max_in_flight,
        max_in_flight_per_key=args.max_in_flight_per_key,
        request_timeout=args.request_timeout,
        max_adapter_bytes=args.max_adapter_mb << 20,
        allowed_hosts=args.allowed_host,
        read_timeout=args.read_timeout,
        peers=peers,
    )
    console.log(
        f"Listening on http://{args.host}:{args.port} (loading the model; /readyz says when ready)"
    )
    try:
        return serve(options, args.host, args.port, ready=lambda message: console.log(message))
    except (ManifestError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return ExitCode.BAD_INPUT


def _peers(args: argparse.Namespace) -> Any:
    """The other replicas (--peers-service or --peers), and this one's address among them."""
    from sectune.serving.peers import Peers

    if not (args.peers_service or args.peers):
        return None
    if args.peers_service and args.peers:
        raise ValueError("give --peers-service or --peers, not both")
    own = args.advertise or (
        f"{os.environ['SECTUNE_POD_IP']}:{args.port}" if os.environ.get("SECTUNE_POD_IP") else ""
    )
    if not own:
        raise ValueError(
            "--advertise HOST:PORT: how the other replicas reach this one (in a pod, "
            "SECTUNE_POD_IP from the downward API)"
        )
    fixed = tuple(a.strip() for a in (args.peers or "").split(",") if a.strip())
    if fixed and own not in fixed:
        raise ValueError(f"--peers: this replica's own address {own!r} is not among them")
    return Peers(own=own, service=args.peers_service, port=args.port, fixed=fixed)


def artifacts_cap_mb() -> int:
    from sectune.artifacts import MAX_ARTIFACT_BYTES

    return MAX_ARTIFACT_BYTES >> 20


def cmd_promote(args: argparse.Namespace) -> int:
    """Edit an AdapterDeployment YAML in a Git working tree: promote, canary, finalize, roll back."""
    from sectune.promote import PromoteError, from_job, promote, verify

    try:
        candidate = None
        if args.job:
            candidate = from_job(args.job)
        elif args.version:
            candidate = verify(args.version, args.sha256)
        done, diff = promote(
            Path(args.to),
            args.adapter,
            candidate,
            name=args.name,
            canary=args.canary,
            finalize=args.finalize,
            rollback=args.rollback,
        )
    except PromoteError as exc:
        console.print(f"[red]error:[/] {exc}")
        return ExitCode.BAD_INPUT
    print(diff, end="")
    console.print(f"{args.to}: {done}. Review the diff, commit and open a pull request.")
    return ExitCode.OK


def cmd_fetch_adapters(args: argparse.Namespace) -> int:
    """Verify every version of a ServingConfig onto disk (vLLM's init container)."""
    from sectune import artifacts, storage
    from sectune.serving.config import load_serving_config
    from sectune.serving.fetch import fetch_adapters
    from sectune.serving.verify import LoadError
    from sectune.training.base_model import ModelError

    try:
        config = load_serving_config(Path(args.config))
        fetched = fetch_adapters(config, Path(args.out), args.max_adapter_mb << 20)
    except (
        ManifestError,
        LoadError,
        ModelError,
        artifacts.IntegrityError,
        storage.StorageError,
    ) as exc:
        console.print(f"[red]error:[/] {exc}")
        return ExitCode.BAD_INPUT  # as `sectune serve` says it
    for line in fetched:
        print(line)
    return ExitCode.OK


def _access_log_on_stdout(enabled: bool) -> None:
    """The access log is JSON lines on stdout, apart from the server's own log on stderr."""
    access = logging.getLogger("sectune.access")
    access.setLevel(logging.INFO if enabled else logging.WARNING)
    access.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)


def cmd_route_vllm(args: argparse.Namespace) -> int:
    """The front of a vLLM replica (its pods' sidecar): the API port routed by traffic weight,
    guarded by the deployment's keys and measured per version; metrics and readiness on
    --metrics-port."""
    import uvicorn

    from sectune.serving.auth import KeysFile
    from sectune.serving.config import load_serving_config
    from sectune.serving.http import protocol_with_timeout
    from sectune.serving.metrics import ServingMetrics
    from sectune.serving.observe import API_KEY_ENV, serve
    from sectune.serving.vllm_router import Router, RoutingTable, create_app

    keys = KeysFile(Path(args.api_keys_file)) if args.api_keys_file else None
    try:
        config = load_serving_config(Path(args.config))
        if keys is not None:
            keys.load()
        metrics = ServingMetrics()
        watch = serve(
            config, Path(args.adapters), args.vllm_url, args.host, args.metrics_port, metrics
        )
    except ManifestError as exc:
        console.print(f"[red]error:[/] {exc}")
        return ExitCode.BAD_INPUT
    for name in ("sectune.observe", "sectune.route"):
        logging.getLogger(name).setLevel(logging.INFO)
    _access_log_on_stdout(True)
    router = Router(
        args.vllm_url, RoutingTable(config), keys, metrics, os.environ.get(API_KEY_ENV) or None
    )
    threading.Thread(target=watch.serve_forever, daemon=True).start()
    console.log(
        f"Routing :{args.port} to {args.vllm_url}; metrics on :{args.metrics_port}/metrics, "
        "readiness /ready"
    )
    uvicorn.run(
        create_app(router),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        http=protocol_with_timeout(10.0),
        timeout_keep_alive=5,
    )
    watch.shutdown()
    return ExitCode.OK


def cmd_fetch_demo(args: argparse.Namespace) -> int:
    from sectune.training.base_model import fetch_demo_model

    console.log("Fetching the demo base model (SmolLM2-135M-Instruct; converted once, then cached)")
    path = fetch_demo_model()
    console.print(f"Demo model ready: {path}")
    return ExitCode.OK


def cmd_data_check(args: argparse.Namespace) -> int:
    """Validate and sanitize a manifest's data without training; print the data report."""
    from sectune.data.load import DataError
    from sectune.data.prepare import prepare_data
    from sectune.storage import StorageError

    try:
        manifest = load_manifest(args.manifest)
        data = prepare_data(manifest.spec)
    except (ManifestError, DataError, StorageError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return ExitCode.BAD_INPUT
    print(data.report.to_json())
    return ExitCode.OK


def _audit_file(uri: str, test: str | None, labels: list[str]) -> tuple[Any, Any]:
    """A data file audited on its own: every row validated and sanitized (no dedup, no
    split), `test` as the held-out rows; labels from --labels or the file."""
    from sectune.config import JobSpec
    from sectune.data.audit import audit
    from sectune.data.load import DataError, read_rows
    from sectune.data.prepare import load_examples, raise_or_report, sanitize_examples

    if not labels:
        rows, _ = read_rows(uri)
        labels = sorted({str(r.values["label"]) for r in rows if r.values.get("label")})
    if len(labels) < 2:
        raise DataError(
            f"{uri}: found {len(labels)} label(s) in the `label` field; name them with --labels "
            "or audit a manifest"
        )
    spec = JobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///not-loaded"},
            "dataset": {"train": uri, "test": test},
            "task": {"type": "classification", "labels": labels},
        }
    )
    problems: list[str] = []
    seen: dict[str, str] = {}
    train = load_examples(uri, spec, problems, seen)
    held_out = load_examples(test, spec, problems, seen) if test else []
    raise_or_report(problems, spec, DataReport())
    sanitize_examples([*train, *held_out], spec)
    return spec, (audit(train, held_out, spec), train)


def _as_uri(value: str) -> str:
    return value if "://" in value else Path(value).resolve().as_uri()


def cmd_data_audit(args: argparse.Namespace) -> int:
    """Audit a manifest's data (as the job will see it) or a data file; print the findings
    and write the review files."""
    from sectune.data.audit import check_limits
    from sectune.data.load import DataError
    from sectune.data.prepare import prepare_data
    from sectune.data.review import review_rows, write_review
    from sectune.storage import StorageError

    target = args.target
    try:
        if target.endswith((".yaml", ".yml")):
            manifest = load_manifest(target)
            spec = manifest.spec
            if not spec.dataset.quality.audit:
                spec = spec.model_copy(
                    update={
                        "dataset": spec.dataset.model_copy(
                            update={
                                "quality": spec.dataset.quality.model_copy(update={"audit": True})
                            }
                        )
                    }
                )
            data = prepare_data(spec, enforce_limits=False)
            assert data.audit is not None
            result, train = data.audit, data.train
        else:
            labels = [x.strip() for x in (args.labels or "").split(",") if x.strip()]
            spec, (result, train) = _audit_file(
                _as_uri(target), _as_uri(args.test) if args.test else None, labels
            )
    except (ManifestError, DataError, StorageError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return ExitCode.BAD_INPUT
    result.broken_limits = check_limits(result, spec.dataset.quality)
    lines = review_rows(result, {e.id: e for e in train})
    csv_path, jsonl_path = write_review(lines, Path(args.out))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        console.print(_audit_table(result))
        for warning in result.warnings():
            console.print(f"[yellow]warning:[/] {warning}")
    console.print(
        f"Review: {len(lines)} flagged row(s) in {csv_path} and {jsonl_path}; mark `decision` "
        "keep, relabel (with newLabel) or drop, then `sectune data review apply`",
        soft_wrap=True,
    )
    for broken in result.broken_limits:
        console.print(f"[red]limit broken:[/] {broken}")
    return ExitCode.BAD_INPUT if result.broken_limits else ExitCode.OK


def _audit_table(result: Any) -> Table:
    table = Table(title="Data audit", show_header=True)
    table.add_column("finding")
    table.add_column("rows", justify="right")
    table.add_column("of", justify="right")
    errors = result.label_errors_total
    table.add_row(
        "suspected label errors",
        "not measured" if errors is None else str(errors),
        str(result.train_rows),
    )
    table.add_row(
        "near-duplicates in training", str(result.near_duplicates_total), str(result.train_rows)
    )
    table.add_row("conflicting labels", str(result.conflicts_total), str(result.train_rows))
    table.add_row(
        "held-out rows leaking from training", str(result.leaked_total), str(result.held_out_rows)
    )
    table.add_row(
        "labels under the minimum",
        str(len(result.coverage.labels_under_minimum)),
        str(len(result.coverage.labels)),
    )
    return table


def cmd_data_review_apply(args: argparse.Namespace) -> int:
    """Apply analysts' decisions: a new dataset version and its provenance record."""
    from sectune.data.load import DataError
    from sectune.data.review import apply_review
    from sectune.storage import StorageError

    labels: list[str] = []
    id_field, label_field = "id", "label"
    try:
        if args.manifest:
            spec = load_manifest(args.manifest).spec
            labels = list(spec.task.labels)
            id_field, label_field = spec.dataset.fields.id, spec.dataset.fields.label
        record = apply_review(
            _as_uri(args.data),
            Path(args.review),
            _as_uri(args.out),
            args.reviewer,
            id_field=id_field,
            label_field=label_field,
            labels=labels,
        )
    except (ManifestError, DataError, StorageError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return ExitCode.BAD_INPUT
    counts = ", ".join(f"{k} {v}" for k, v in sorted(record.counts.items()))
    console.print(
        f"Reviewed version: {record.result.uri} ({record.result.rows} rows, sha256 "
        f"{record.result.sha256}); {counts}",
        soft_wrap=True,
    )
    console.print(f"Provenance: {record.result.uri}.provenance.json", soft_wrap=True)
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sectune", description="Fine-tune and serve LLMs for security work."
    )
    parser.add_argument("--version", action="version", version=f"sectune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run a FineTuneJob manifest on this machine, without a cluster"
    )
    run.add_argument("manifest", help="FineTuneJob YAML")
    run.add_argument(
        "--cpu", action="store_true", help="train on CPU even if the manifest asks for GPUs"
    )
    run.add_argument("--output", help="output URI prefix (overrides spec.output.uri)")
    run.add_argument(
        "--metrics-port", type=int, help="serve Prometheus training metrics on this port"
    )
    run.set_defaults(func=cmd_run)

    train = sub.add_parser(  # the trainer pod's command: sectune.contract.TRAIN_ARGS
        "train", help="run the job config the operator wrote (in the training pod)"
    )
    train.add_argument("--config", required=True, help="JSON with name and spec")
    train.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("SECTUNE_METRICS_PORT", str(contract.METRICS_PORT))),
    )
    train.add_argument(
        "--termination-log",
        default=os.environ.get("SECTUNE_TERMINATION_LOG", contract.TERMINATION_LOG),
        help="where Kubernetes reads the result from (the pod's terminationMessagePath)",
    )
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "evaluate", help="evaluate a stored adapter, or a served one, on labelled data"
    )
    target = evaluate.add_mutually_exclusive_group(required=True)
    target.add_argument("--adapter", help="job prefix (uses current.json) or versions/<run> URI")
    target.add_argument("--endpoint", help="URL of a running sectune server (with --model)")
    evaluate.add_argument(
        "--model", help="with --endpoint: the adapter to evaluate, name or name@version"
    )
    evaluate.add_argument(
        "--key-file",
        "--api-key-file",
        dest="api_key_file",
        help="with --endpoint: file holding this client's API key (default: $SECTUNE_API_KEY)",
    )
    evaluate.add_argument(
        "--precision",
        choices=list(INFERENCE_PRECISIONS),
        default="auto",
        help="with --adapter: auto (the numerics training evaluated with on this hardware: "
        "float32 on CPUs without native bf16), bf16 weights, autocast (float32 weights, bf16 "
        "autocast) or fp32",
    )
    evaluate.add_argument(
        "--data", required=True, help="labelled data URI (same format as training)"
    )
    evaluate.add_argument("--gates", help="YAML list of gates (default: the job's own)")
    evaluate.add_argument(
        "--recall-targets",
        help="with --adapter: label=recall,… to fit a decision rule on these rows and report "
        "its cross-fitted figures next to argmax's (the stored version is not changed)",
    )
    evaluate.add_argument(
        "--baselines",
        default="tfidf",
        help="with --adapter: baselines measured again on these rows, comma-separated from "
        "tfidf (re-fit on the job's training data), base, fewShot (the base model), or none; "
        "the others come from the training-time report (default: tfidf)",
    )
    evaluate.add_argument(
        "--out", default="evaluation", help="directory for report.json and report.html"
    )
    evaluate.set_defaults(func=cmd_evaluate)

    serve_cmd = sub.add_parser(
        "serve", help="serve a base model with adapters from storage (OpenAI-compatible API)"
    )
    serve_cmd.add_argument("--config", help="ServingConfig YAML; re-read when it changes")
    serve_cmd.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="name=URI of a job prefix (follows its current.json); repeatable",
    )
    serve_cmd.add_argument(
        "--base-model", help="base model URI (default: the one the adapters were trained on)"
    )
    serve_cmd.add_argument(
        "--feedback-store",
        help="file:// or s3:// prefix where analysts' verdicts (POST /v1/feedback) are kept",
    )
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve_cmd.add_argument(
        "--peers-service",
        help="DNS name of a headless Service listing every replica: a verdict on another "
        "replica's answer is passed to it (more than one replica with a feedback store)",
    )
    serve_cmd.add_argument(
        "--peers", help="host:port of every replica, comma-separated (instead of a Service)"
    )
    serve_cmd.add_argument(
        "--advertise",
        help="host:port the other replicas reach this one at (default: $SECTUNE_POD_IP:port)",
    )
    serve_cmd.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve_cmd.add_argument(
        "--api-keys-file",
        help="require Authorization: Bearer <key>; one '<key-id> <key> [adapters] "
        "[concurrency=N] [rate=R]' per line, # comments; re-read when it changes (default: $SECTUNE_API_KEYS_FILE; none: no authentication)",
    )
    serve_cmd.add_argument(
        "--metrics-token-file",
        help="require Authorization: Bearer <token> on /metrics, the token read from this file "
        "(default: $SECTUNE_METRICS_TOKEN_FILE; none: /metrics is open to whoever reaches the "
        "port, and shows adapter names, versions, digests and label counts)",
    )
    serve_cmd.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="Host header to answer (repeatable; default: loopback names on a loopback "
        "address, any host otherwise)",
    )
    serve_cmd.add_argument(
        "--max-in-flight",
        type=int,
        default=64,
        help="inference requests accepted at once; more get 429 with Retry-After",
    )
    serve_cmd.add_argument(
        "--max-in-flight-per-key",
        type=int,
        default=16,
        help="inference requests one API key may have in flight (a key's concurrency= in "
        "the keys file overrides it)",
    )
    serve_cmd.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds before a request gets 504"
    )
    serve_cmd.add_argument(
        "--read-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send a whole request; slower connections are closed",
    )
    serve_cmd.add_argument(
        "--max-adapter-mb",
        type=int,
        default=artifacts_cap_mb(),
        help="largest adapter version downloaded, in MiB (default: $SECTUNE_MAX_ARTIFACT_BYTES "
        "or 8192)",
    )
    serve_cmd.add_argument(
        "--precision",
        choices=list(INFERENCE_PRECISIONS),
        default="auto",
        help="auto: 16-bit weights on GPUs and on CPUs with native bf16, float32 elsewhere; "
        "bf16: bfloat16 weights; autocast: float32 weights with bfloat16 autocast, as "
        "training-time evaluation computes; fp32: float32 throughout",
    )
    serve_cmd.add_argument("--max-batch", type=int, default=16, help="requests per forward pass")
    serve_cmd.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill"
    )
    serve_cmd.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="compute every classify prompt whole, not after the cached keys and values of "
        "the head an adapter's prompts share",
    )
    serve_cmd.add_argument(
        "--reload-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the config file (job prefixes' current.json: every 5 s)",
    )
    serve_cmd.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="do not write the JSON access log (one line per /v1/ request on stdout)",
    )
    serve_cmd.set_defaults(func=cmd_serve)

    promote_cmd = sub.add_parser(
        "promote",
        help="put a trained version into an AdapterDeployment YAML (GitOps): promote, canary, "
        "finalize or roll back; prints the diff",
    )
    source = promote_cmd.add_mutually_exclusive_group()
    source.add_argument("--job", help="NAMESPACE/NAME of a Succeeded FineTuneJob (kubeconfig)")
    source.add_argument("--version", help="a stored version URI, or a job prefix (current.json)")
    promote_cmd.add_argument("--sha256", help="with --version: the manifest digest to expect")
    promote_cmd.add_argument("--to", required=True, help="the AdapterDeployment YAML file to edit")
    promote_cmd.add_argument("--adapter", required=True, help="adapter name in that file")
    promote_cmd.add_argument("--name", help="version name (default: the next vN)")
    promote_cmd.add_argument("--canary", type=int, metavar="PERCENT", help="start as a canary")
    ending = promote_cmd.add_mutually_exclusive_group()
    ending.add_argument("--finalize", action="store_true", help="move all traffic to the canary")
    ending.add_argument(
        "--rollback", action="store_true", help="back to the previous stable version"
    )
    promote_cmd.set_defaults(func=cmd_promote)

    fetch = sub.add_parser(
        "fetch-adapters",
        help="verify every adapter version of a ServingConfig onto disk (vLLM init container)",
    )
    fetch.add_argument("--config", required=True, help="ServingConfig YAML")
    fetch.add_argument("--out", required=True, help="directory to place base/ and adapters in")
    fetch.add_argument(
        "--max-adapter-mb",
        type=int,
        default=artifacts_cap_mb(),
        help="largest adapter version downloaded, in MiB",
    )
    fetch.set_defaults(func=cmd_fetch_adapters)

    route = sub.add_parser(
        "route-vllm",
        help="the front of a vLLM server: route by traffic weight, check keys, measure per "
        "version (vLLM pods' sidecar)",
    )
    route.add_argument("--config", required=True, help="ServingConfig YAML")
    route.add_argument("--adapters", required=True, help="the directory fetch-adapters filled")
    route.add_argument("--vllm-url", default="http://127.0.0.1:8001", help="vLLM's address")
    route.add_argument("--host", default="0.0.0.0")
    route.add_argument("--port", type=int, default=8000, help="the API port clients call")
    route.add_argument("--metrics-port", type=int, default=9400, help="/metrics and /ready")
    route.add_argument(
        "--api-keys-file", help="the keys clients present (as sectune serve --api-keys-file)"
    )
    route.set_defaults(func=cmd_route_vllm)

    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser(
        "check", help="validate and sanitize a manifest's data; print the report"
    )
    check.add_argument("manifest")
    check.set_defaults(func=cmd_data_check)
    audit = data_sub.add_parser(
        "audit",
        help="find suspected label errors, near-duplicates, leakage and coverage gaps; write "
        "a review file",
    )
    audit.add_argument("target", help="a FineTuneJob manifest (.yaml) or a data file")
    audit.add_argument("--test", help="held-out data file to check for leakage (data file only)")
    audit.add_argument(
        "--labels", help="comma-separated labels (data file only; default: the file's)"
    )
    audit.add_argument("--out", default="review", help="folder for review.csv and review.jsonl")
    audit.add_argument("--json", action="store_true", help="print the findings as JSON")
    audit.set_defaults(func=cmd_data_audit)
    review = data_sub.add_parser("review", help="expert review of audited rows")
    review_sub = review.add_subparsers(dest="review_command", required=True)
    apply = review_sub.add_parser(
        "apply", help="write a reviewed dataset version and its provenance record"
    )
    apply.add_argument("--data", required=True, help="the data file that was audited")
    apply.add_argument("--review", required=True, help="the review file (.csv or .jsonl)")
    apply.add_argument("--out", required=True, help="the new version (.jsonl)")
    apply.add_argument("--reviewer", required=True, help="who reviewed (goes in the record)")
    apply.add_argument(
        "--manifest", help="the job's manifest: its labels and field names check the review"
    )
    apply.set_defaults(func=cmd_data_review_apply)

    models = sub.add_parser("models", help="base model tools")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    demo = models_sub.add_parser(
        "fetch-demo", help="obtain the demo base model (SmolLM2-135M-Instruct)"
    )
    demo.set_defaults(func=cmd_fetch_demo)
    _with_defaults_shown(parser)
    return parser


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help that shows each option's default, unless it has none or the text names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, [], argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def _with_defaults_shown(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _HelpWithDefaults
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _with_defaults_shown(child)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("SECTUNE_LOG_LEVEL", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Deprecation notices from the ML libraries are for their callers' authors, not users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("presidio-analyzer", "transformers", "accelerate", "bitsandbytes", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
