"""Throughput and latency of the label service, one client against many, in one run.

    python benchmarks/serve_load.py --model models/student [--input data/reports.jsonl] \
        [--reports 400] [--clients 8] [--per-call 10] [--json OUT]
    python benchmarks/serve_load.py --url http://127.0.0.1:3000 [--api-key KEY] ...   # a running server

Starts `deberta-rad serve` on a free loopback port (unless --url is given), warms it up, then sends the
same reports twice: from one client, call after call (the baseline: no two calls can share a batch), and
from --clients clients at once, whose calls BentoML's adaptive batching merges. Prints reports/s and
per-call p50/p95 latency for both; never prints report text.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from deberta_rad.data import read_reports
from deberta_rad.net import free_port
from deberta_rad.synthetic import generate_corpus


def start_server(model: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [str(Path(sys.executable).parent / "deberta-rad"), "serve", "--model", model, "--port", str(port)]
    env = os.environ | {"DEBERTA_RAD_SERVE_POLL_S": "0"}
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; see {log}")
        try:
            if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
                return server, url
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready within 300 s; see {log}")


def calls_of(items: list[dict], per_call: int) -> list[list[dict]]:
    return [items[i : i + per_call] for i in range(0, len(items), per_call)]


def run_load(url: str, calls: list[list[dict]], clients: int, headers: dict) -> dict:
    """Send every call, `clients` at a time; reports/s over the wall time, latency per call."""

    def send(call: list[dict]) -> float:
        started = time.perf_counter()
        answer = requests.post(f"{url}/label", json={"reports": call}, headers=headers, timeout=600)
        answer.raise_for_status()
        if [r["report_id"] for r in answer.json()["results"]] != [r["report_id"] for r in call]:
            raise SystemExit("the service answered out of order")
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(send, calls))
    wall = time.perf_counter() - started
    n_reports = sum(len(call) for call in calls)
    return {
        "clients": clients,
        "reports": n_reports,
        "reports_per_s": round(n_reports / wall, 1),
        "p50_latency_s": round(float(np.percentile(latencies, 50)), 3),
        "p95_latency_s": round(float(np.percentile(latencies, 95)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/student", help="model directory or MLflow URI to serve")
    parser.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("DEBERTA_RAD_SERVE_API_KEY"))
    parser.add_argument("--input", type=Path, default=None, help="reports (JSONL/CSV); default: synthetic")
    parser.add_argument("--reports", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-call", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    source = read_reports(args.input) if args.input else [r for r, _ in generate_corpus(args.reports, seed=11)]
    items = [{"report_id": f"{i}-{r.report_id}", "text": r.text} for i, r in enumerate(source[: args.reports])]
    calls = calls_of(items, args.per_call)
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    server = None
    if args.url is None:
        server, url = start_server(args.model, Path("serve-benchmark.log"))
    else:
        url = args.url
    try:
        run_load(url, calls[: args.clients], args.clients, headers)  # warm-up: first batches, thread pools
        results = {
            "baseline_one_client": run_load(url, calls, 1, headers),
            "concurrent": run_load(url, calls, args.clients, headers),
        }
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    results["speedup"] = round(
        results["concurrent"]["reports_per_s"] / results["baseline_one_client"]["reports_per_s"], 2
    )
    print(f"{'run':<22}{'clients':>8}{'reports':>9}{'reports/s':>11}{'p50 s':>8}{'p95 s':>8}")
    for name in ("baseline_one_client", "concurrent"):
        r = results[name]
        print(
            f"{name:<22}{r['clients']:>8}{r['reports']:>9}{r['reports_per_s']:>11}{r['p50_latency_s']:>8}{r['p95_latency_s']:>8}"
        )
    print(f"speedup from adaptive batching across clients: {results['speedup']}x ({args.per_call} reports per call)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
