"""`python -m sectune_operator`: run the operator. Its settings (SECTUNE_* environment
variables, sectune_operator.settings) are read once, here."""

from __future__ import annotations

import argparse
import logging
import os
import secrets

import kopf

QUIET_HANDLERS = ("Handler 'child_changed", "Handler 'jobs_by_owner", "Handler 'pods_by_owner")
"""Handlers that run on every Job and Pod event: their "succeeded" lines say nothing (failures
are still logged). At 1,000 jobs they were most of the log, and writing it cost CPU."""


def _not_routine(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not (
        record.levelno == logging.INFO
        and message.endswith("succeeded.")
        and message.startswith(QUIET_HANDLERS)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sectune-operator", description=__doc__)
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[n for n in os.environ.get("SECTUNE_WATCH", "").split(",") if n],
        help="watch only these namespaces (repeatable, or SECTUNE_WATCH=a,b); default: all",
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("SECTUNE_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="liveness endpoint URL",
    )
    parser.add_argument(
        "--peering",
        default=os.environ.get("SECTUNE_PEERING", "sectune"),
        help="peering object for leader election; '' runs standalone",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=int(os.environ["SECTUNE_PRIORITY"]) if os.environ.get("SECTUNE_PRIORITY") else None,
        help="peering priority of this replica; the highest acts, the others stand by (default: "
        "a random one, so replicas of one Deployment never tie: kopf pauses every operator "
        "that sees a peer of equal priority)",
    )
    args = parser.parse_args(argv)
    if args.priority is None:
        args.priority = 1 + secrets.randbelow(2**31 - 2)

    from sectune_operator import handlers
    from sectune_operator.settings import Settings

    settings = Settings()
    handlers.register(settings)

    kopf.configure(
        verbose=os.environ.get("SECTUNE_LOG_LEVEL", "").upper() == "DEBUG",
        log_format=kopf.LogFormat.PLAIN,
        log_refkey="object",
    )
    logging.getLogger("kopf.objects").addFilter(_not_routine)

    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        standalone=not args.peering,
        peering_name=args.peering or None,
        priority=args.priority,
        memo=kopf.Memo(settings=settings, peering=(args.peering, tuple(args.namespace))),
    )


if __name__ == "__main__":
    main()
