"""`aspkd serve-victim` (the victim as a live HTTP API) and `aspkd budget` (the ledger)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys

from aspkd_ray.cli.main import add_common, load_config
from aspkd_ray.errors import UsageError, UserError


def register(sub) -> None:
    p = sub.add_parser("serve-victim", help="serve the trained victim over HTTP (MLflow)",
                       description="Serve the configured victim checkpoint with `mlflow models "
                                   "serve` (this environment, --env-manager local), so an "
                                   "attack can run against a live API: set victim.endpoint to "
                                   "the printed URL. Blocks until Ctrl-C.")
    add_common(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default loopback only; the server has no "
                        "authentication)")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.set_defaults(func=run_serve)

    b = sub.add_parser("budget", help="print the teacher ledger: spent, left, per class",
                       description="Read the teacher service's ledger (no Ray needed) and "
                                   "print the budget: spent, left, per class, per trial, and "
                                   "samples reserved but never answered.")
    add_common(b)
    b.add_argument("--ledger", metavar="URI", default=None,
                   help="ledger folder or URI (default: budget.ledger, else "
                        "<output_dir>/ledger)")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=run_budget)


def run_serve(args: argparse.Namespace) -> int:
    from aspkd_ray.teacher.serving import start_victim_server, stop_victim_server

    cfg = load_config(args)
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port: got {args.port}; expected a port in 1..65535.")
    if not _is_loopback(args.host):
        print(f"aspkd: warning: serving on {args.host}: anyone who reaches this interface can "
              f"query the victim (no authentication).", file=sys.stderr)
    try:
        url, proc = start_victim_server(cfg, port=args.port, host=args.host)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    print(f"victim ({cfg.victim.output} labels) served at {url}  (MLflow scoring protocol: "
          f"POST {url}/invocations)", flush=True)
    print(f"attack it with: --set victim.endpoint={url} --set victim.protocol=mlflow; "
          f"Ctrl-C stops the server", flush=True)
    try:
        rc = proc.wait()
        print(f"aspkd: the server stopped (exit code {rc}); log: {proc.log_path}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_victim_server(proc)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_budget(args: argparse.Namespace) -> int:
    from aspkd_ray.teacher import Ledger

    cfg = load_config(args)
    from aspkd_ray.layout import run_layout

    uri = args.ledger or run_layout(cfg).ledger
    try:
        ledger = Ledger(uri, create=False)  # checked: a corrupt ledger is an error here too
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    status, holder = ledger.status(), ledger.holder()
    if args.json:
        print(json.dumps({**status, "per_class": {str(k): v for k, v in
                                                  status["per_class"].items()},
                          "writer": holder}, indent=2))
        return 0
    print(f"ledger:   {status['ledger']}  ({status['output']} labels, "
          f"{status['num_classes']} classes)")
    print(f"spent:    {status['spent']} of {status['budget']}  (left {status['left']})")
    print("per class: " + (", ".join(f"{c}: {n}" for c, n in status["per_class"].items())
                           or "none"))
    if status["trial_spent"]:
        print("per trial: " + ", ".join(f"{t}: {n}" for t, n in status["trial_spent"].items()))
    unanswered = status["reserved_unanswered"]
    print(f"reserved but unanswered (spent): {len(unanswered)}"
          + (f"  e.g. {', '.join(unanswered[:5])}" if unanswered else ""))
    if holder is not None:
        from aspkd_ray.teacher.lease import describe_holder

        state = "released" if holder.get("released") else "holding the lease"
        print(f"writer:   {state}: {describe_holder(holder)}")
    if status["failed_attempts"]:
        print(f"failed victim calls: {status['failed_attempts']} (last: "
              f"{status['last_error']})")
    return 0
