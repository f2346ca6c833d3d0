"""Operator scale: create N FineTuneJobs at once against the real control plane and measure

- time from create to training Job created (p50, p99) and until all N have Jobs,
- time from the pod finishing to FineTuneJob Succeeded (p50, p99) for a sample,
- API requests the operator made per job, by verb and resource (kube-apiserver's audit log
  of the operator's identity; watches and the peering keep-alive included),
- the operator's resident memory.

    python benchmarks/operator_scale.py --jobs 1000 --finish 100 [--profile DIR]

--profile samples the operator with py-spy from the first create until every Job exists and
writes DIR/operator.txt: the functions where its time went (own and cumulative samples).

Results go in BENCHMARKS.md. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kubernetes import client, config, watch  # noqa: E402

from support.controlplane import ControlPlane, add_gpu_nodes  # noqa: E402
from support.operator import (  # noqa: E402
    OPERATOR_ACCOUNT,
    OPERATOR_NAMESPACE,
    OperatorProcess,
    install_chart_rbac,
)
from support.processes import wait_until  # noqa: E402

GROUP, VERSION, PLURAL = "sectune.io", "v1alpha1", "finetunejobs"
NAMESPACE = "scale"
RESULT = json.dumps(
    {
        "phase": "Succeeded",
        "reason": "GatesPassed",
        "adapter": {"uri": "s3://a/b", "sha256": "0" * 64},
    }
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"


def operator_requests(plane: ControlPlane, skip: int) -> Counter[str]:
    """The operator's requests after the first `skip` audit entries, as "verb resource"
    (e.g. "patch finetunejobs/status", "create events")."""
    counts: Counter[str] = Counter()
    for entry in plane.audited_requests()[skip:]:
        ref = entry.get("objectRef") or {}
        resource = ref.get("resource", entry.get("requestURI", "?"))
        if ref.get("subresource"):
            resource += "/" + ref["subresource"]
        counts[f"{entry['verb']} {resource}"] += 1
    return counts


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (the kernel's high-water mark, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds_by_process() -> Counter[str]:
    """CPU seconds (user + system) so far of this benchmark's descendants, by command name:
    which of the processes sharing the cores did the work."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    usage: dict[int, tuple[str, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid = int(text.split(" ", 1)[0])
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        parents[pid] = int(fields[1])
        usage[pid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    mine, frontier = set(), {os.getpid()}
    while frontier:
        mine |= frontier
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - mine
    totals: Counter[str] = Counter()
    for pid in mine - {os.getpid()}:
        name, seconds = usage[pid]
        totals[name] += seconds
    return totals


def _start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--rate", "50", "--format", "raw",
         "--output", str(out / "operator.folded"), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _summarise_profile(profiler: subprocess.Popen[bytes], out: Path, top: int = 40) -> None:
    """Folded stacks -> the functions with the most own and cumulative samples."""
    profiler.send_signal(signal.SIGINT)
    profiler.wait(timeout=60)
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = 0
    for line in (out / "operator.folded").read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1] for f in stack.split(";")]
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            cumulative[frame] += n
    lines = [f"{total} samples at 50 Hz while the Jobs were being created", "", "own:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "cumulative:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in cumulative.most_common(top)]
    (out / "operator.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument(
        "--finish", type=int, default=100, help="how many pods to finish for the Succeeded timing"
    )
    parser.add_argument(
        "--status-interval", type=float, default=5.0, help="the operator's SECTUNE_STATUS_INTERVAL"
    )
    parser.add_argument("--profile", type=Path, help="directory for a py-spy profile")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sectune-scale-"))
    plane = ControlPlane(workdir, audit_users=(OPERATOR_USER,)).start()
    try:
        api = config.new_client_from_config(str(plane.kubeconfig))
        core, batch, objects = (
            client.CoreV1Api(api),
            client.BatchV1Api(api),
            client.CustomObjectsApi(api),
        )
        add_gpu_nodes(
            core, tuple(f"kwok-gpu-{i}" for i in range(10)), gpus=110, cpu="1000", memory="16Ti"
        )
        assert plane.kubectl("apply", "--server-side", "-f", str(ROOT / "crds")).returncode == 0
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all")
        kubeconfig = install_chart_rbac(plane, api)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        wait_until(
            lambda: bool(core.list_namespaced_service_account(NAMESPACE).items), 30, "default SA"
        )
        core.create_namespaced_secret(
            NAMESPACE,
            {
                "metadata": {"name": "storage"},
                "stringData": {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"},
            },
        )
        operator = OperatorProcess(
            kubeconfig,
            workdir,
            env={
                "SECTUNE_WATCH": NAMESPACE,
                "SECTUNE_STATUS_INTERVAL": str(args.status_interval),
                # kwok's pod IPs answer nothing, so every progress read would wait out its 1 s
                # timeout; a real pod that is still loading refuses at once. A closed local
                # port behaves like that pod.
                "SECTUNE_PROGRESS_URL": "http://127.0.0.1:9/metrics",
            },
        ).start()

        created: dict[str, float] = {}
        job_seen: dict[str, float] = {}
        done = threading.Event()

        def watch_jobs() -> None:
            # A busy apiserver may end a watch early: watch again (it starts with every Job
            # that exists, so none is missed; one seen only then is timed late, not lost).
            while len(job_seen) < args.jobs and not done.is_set():
                try:
                    for event in watch.Watch().stream(
                        batch.list_namespaced_job, NAMESPACE, timeout_seconds=3600
                    ):
                        name = event["object"].metadata.name.removesuffix("-train")
                        job_seen.setdefault(name, time.monotonic())
                        if len(job_seen) >= args.jobs or done.is_set():
                            return
                except Exception as exc:  # reported, then watched again
                    print(f"Job watch ended ({exc}); watching again", file=sys.stderr)
                    time.sleep(0.5)

        watcher = threading.Thread(target=watch_jobs, daemon=True)
        watcher.start()
        audit_before = len(plane.audited_requests())

        def create(i: int) -> None:
            name = f"job-{i:04d}"
            body = {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name},
                "spec": {
                    "baseModel": {"uri": "s3://m/base"}, "dataset": {"train": "s3://d/t.jsonl"},
                    "task": {"labels": ["a", "b"]}, "resources": {"gpus": 1},
                    "output": {"uri": "s3://out", "credentials": {"name": "storage"}},
                },
            }  # fmt: skip
            created[name] = time.monotonic()
            objects.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)

        pid = operator.server.process.pid  # type: ignore[union-attr]
        profiler = _start_profiler(pid, args.profile) if args.profile else None
        cpu_before = cpu_seconds_by_process()
        start = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(args.jobs)))
        create_seconds = time.monotonic() - start
        wait_until(lambda: len(job_seen) >= args.jobs, 3600, "all Jobs", interval=1)
        all_jobs_seconds = time.monotonic() - start
        cpu_creating = cpu_seconds_by_process()
        cpu_creating.subtract(cpu_before)
        if profiler is not None:
            _summarise_profile(profiler, args.profile)
        latencies = [job_seen[n] - created[n] for n in created]
        peak_rss = peak_rss_mib(operator.server.process.pid)  # type: ignore[union-attr]
        print(  # the creation half, in case the rest does not finish
            f"all {args.jobs} Jobs in {all_jobs_seconds:.1f} s; create -> Job p50 "
            f"{statistics.median(latencies):.2f} s, p99 {percentile(latencies, 0.99):.2f} s; "
            f"operator peak RSS {peak_rss:.0f} MiB; CPU seconds meanwhile "
            + ", ".join(
                f"{name} {sec:.1f}" for name, sec in cpu_creating.most_common() if sec >= 0.5
            ),
            file=sys.stderr,
            flush=True,
        )

        # Finish a sample of pods; time until their FineTuneJobs are Succeeded. A poller runs
        # from the start, so a job that succeeds while later pods are still being annotated is
        # timed when it succeeded, not when the annotating ended.
        finish_names = sorted(created)[: args.finish]
        finished_at: dict[str, float] = {}
        succeeded: dict[str, float] = {}
        completed: dict[str, float] = {}
        polling = threading.Event()

        def poll_jobs_complete() -> None:
            """When the Job controller marks each sampled Job Complete (upstream of the
            operator), to split "pod done -> Succeeded" into its two parts."""
            while not polling.is_set():
                now = time.monotonic()
                try:
                    jobs = batch.list_namespaced_job(NAMESPACE).items
                except client.ApiException:
                    time.sleep(1)
                    continue
                for job in jobs:
                    name = job.metadata.name.removesuffix("-train")
                    conditions = job.status.conditions or []
                    if name in finished_at and any(
                        c.type == "Complete" and c.status == "True" for c in conditions
                    ):
                        completed.setdefault(name, now)
                time.sleep(0.25)

        def poll_succeeded() -> None:
            while not polling.is_set():
                try:
                    items = objects.list_namespaced_custom_object(
                        GROUP, VERSION, NAMESPACE, PLURAL
                    )["items"]
                except client.ApiException:  # a busy apiserver times a big list out: again
                    time.sleep(1)
                    continue
                now = time.monotonic()
                for item in items:
                    name = item["metadata"]["name"]
                    if (
                        name in finished_at
                        and (item.get("status") or {}).get("phase") == "Succeeded"
                    ):
                        succeeded.setdefault(name, now)
                time.sleep(0.25)

        pod_succeeded: dict[str, float] = {}

        def watch_pods_succeeded() -> None:
            """When kwok marks each sampled pod Succeeded (what the operator waits for)."""
            while not polling.is_set():
                try:
                    for event in watch.Watch().stream(
                        core.list_namespaced_pod, NAMESPACE, timeout_seconds=3600
                    ):
                        pod = event["object"]
                        name = (pod.metadata.labels or {}).get("sectune.io/finetunejob", "")
                        if pod.status.phase == "Succeeded":
                            pod_succeeded.setdefault(name, time.monotonic())
                        if polling.is_set():
                            return
                except Exception:  # a busy apiserver ended the watch: watch again
                    time.sleep(0.5)

        threading.Thread(target=watch_pods_succeeded, daemon=True).start()
        poller = threading.Thread(target=poll_succeeded, daemon=True)
        poller.start()
        threading.Thread(target=poll_jobs_complete, daemon=True).start()
        for name in finish_names:
            selector = f"sectune.io/finetunejob={name}"
            wait_until(
                lambda s=selector: bool(
                    core.list_namespaced_pod(NAMESPACE, label_selector=s).items
                ),
                120,
                "pod",
            )
            pod = core.list_namespaced_pod(NAMESPACE, label_selector=selector).items[0]
            annotations = {
                "sectune.dev/test-exit-code": "0",
                "sectune.dev/test-termination-message": RESULT,
            }
            core.patch_namespaced_pod(
                pod.metadata.name, NAMESPACE, {"metadata": {"annotations": annotations}}
            )
            finished_at[name] = time.monotonic()
        wait_until(lambda: len(succeeded) == len(finished_at), 1800, "Succeeded", interval=0.5)
        polling.set()
        to_succeeded = [succeeded[n] - finished_at[n] for n in finished_at]
        to_complete = [completed[n] - finished_at[n] for n in finished_at if n in completed]
        to_pod_succeeded = [
            pod_succeeded[n] - finished_at[n] for n in finished_at if n in pod_succeeded
        ]
        requests = operator_requests(plane, audit_before)
        events = Counter(
            f"{e.reason} ({e.involved_object.kind})"
            for e in core.list_namespaced_event(NAMESPACE).items
            if e.involved_object.kind == "FineTuneJob"
        )
        done.set()
        result = {
            "jobs": args.jobs,
            "createSeconds": round(create_seconds, 1),
            "allJobsCreatedSeconds": round(all_jobs_seconds, 1),
            "createToJobP50Seconds": round(statistics.median(latencies), 2),
            "createToJobP99Seconds": round(percentile(latencies, 0.99), 2),
            "cpuSecondsWhileCreating": {
                name: round(sec, 1) for name, sec in cpu_creating.most_common() if sec >= 0.5
            },
            "podDoneToSucceededP50Seconds": round(statistics.median(to_succeeded), 2),
            "podDoneToSucceededP99Seconds": round(percentile(to_succeeded, 0.99), 2),
            "podDoneToJobCompleteP50Seconds": round(statistics.median(to_complete), 2)
            if to_complete
            else None,
            # From the annotation that ends the pod to kwok reporting the pod Succeeded: the
            # part of "pod done -> Succeeded" before the operator can see anything.
            "podAnnotatedToPodSucceededP50P99Seconds": [
                round(statistics.median(to_pod_succeeded), 2),
                round(percentile(to_pod_succeeded, 0.99), 2),
            ]
            if to_pod_succeeded
            else None,
            "apiRequestsPerJob": round(sum(requests.values()) / args.jobs, 1),
            "apiRequestsPerJobByKind": {
                kind: round(n / args.jobs, 2) for kind, n in requests.most_common()
            },
            "fineTuneJobEventsPerJob": {
                reason: round(n / args.jobs, 2) for reason, n in events.most_common()
            },
            "operatorPeakRssMiB": round(peak_rss_mib(operator.server.process.pid), 1),  # type: ignore[union-attr]
            "statusIntervalSeconds": args.status_interval,
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result, indent=2))
        operator.stop()
    finally:
        plane.stop()


if __name__ == "__main__":
    main()
