"""Load test of ``nxtp serve``: throughput and latency with dynamic batching against ``--max-batch-size 1``.

    python experiments/random_model.py --config tiny --out /tmp/tiny --images /tmp/photos --count 64
    python experiments/bench_serve.py --checkpoint /tmp/tiny --images /tmp/photos

For each server setting (``--max-batch-size N``, then 1) a server is started on 127.0.0.1 and a free port, and at
each concurrency (1, 8, 32) ``--requests`` raw-body POSTs of the photos are sent by that many client threads.
Bounded: a fixed number of requests, a deadline for each request, and ``--time-limit`` for the whole run, after
which the server's process group is killed and what was measured is printed. The last line is machine-readable:
``throughput ratio at concurrency 32 (batched / unbatched): 3.42x``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, data: bytes, timeout: float) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/predict", body=data, headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class Server:
    """``nxtp serve`` in a process group of its own, killed whole on exit or after the deadline."""

    def __init__(self, checkpoint: str, serve_args: list[str], deadline: float, log: Path) -> None:
        self.port, self.deadline, self.log_path = free_port(), deadline, log
        cmd = [
            sys.executable,
            "-m",
            "lightning_modules.cli",
            "serve",
            "--checkpoint",
            checkpoint,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *serve_args,
        ]
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        while time.time() < self.deadline and self.proc.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"no /health before the deadline; log:\n{self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=max(1.0, min(60.0, self.deadline - time.time())))
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def load(port: int, images: list[bytes], requests: int, concurrency: int, deadline: float) -> dict[str, float]:
    """``requests`` POSTs from ``concurrency`` threads: throughput (requests/s) and latency percentiles (ms)."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(requests))

    def client() -> None:
        while time.time() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                status = post(port, images[i % len(images)], timeout=max(1.0, deadline - time.time()))
            except OSError as e:
                status = type(e).__name__
            with lock:
                (latencies if status == 200 else failures).append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.time()) + 5)
    wall = time.perf_counter() - start
    if not latencies:
        return {
            "ok": 0,
            "failed": len(failures),
            "throughput": 0.0,
            "p50": float("nan"),
            "p95": float("nan"),
            "p99": float("nan"),
        }
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {
        "ok": len(latencies),
        "failed": len(failures),
        "throughput": len(latencies) / wall,
        "p50": 1e3 * q[49],
        "p95": 1e3 * q[94],
        "p99": 1e3 * q[98],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a model folder or .ckpt (random_model.py writes one)")
    parser.add_argument("--images", required=True, help="a folder of JPEG/PNG photos to send (cycled)")
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch-size", type=int, default=32, help="the batched server's --max-batch-size")
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="the batched server's --batch-timeout")
    parser.add_argument("--time-limit", type=float, default=1200, help="seconds for the whole run")
    parser.add_argument("--serve-args", default="", help="more `nxtp serve` options for both servers")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # `timeout` or kill: still stop the server (finally)
    deadline = time.time() + args.time_limit
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        parser.error(f"no .jpg/.png files in {args.images}")
    images = [p.read_bytes() for p in paths]
    settings = {
        f"batched (max {args.max_batch_size})": [
            "--max-batch-size",
            str(args.max_batch_size),
            "--batch-timeout",
            str(args.batch_timeout),
        ],
        "unbatched (max 1)": ["--max-batch-size", "1"],
    }
    print(f"{args.checkpoint}: {len(images)} photos, {args.requests} requests per level, {os.cpu_count()} CPUs")
    results: dict[tuple[str, int], dict[str, float]] = {}
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        for name, serve_args in settings.items():
            server = Server(
                args.checkpoint, serve_args + args.serve_args.split(), deadline, logs / f"{len(results)}.log"
            )
            try:
                server.wait_ready()
                load(server.port, images, min(8, args.requests), 4, deadline)  # warm-up, not counted
                for c in args.concurrency:
                    results[(name, c)] = r = load(server.port, images, args.requests, c, deadline)
                    print(
                        f"{name:>20}  concurrency {c:>3}: {r['throughput']:7.2f} req/s  p50 {r['p50']:8.1f} ms  "
                        f"p95 {r['p95']:8.1f} ms  p99 {r['p99']:8.1f} ms  ({r['ok']} ok, {r['failed']} failed)",
                        flush=True,
                    )
            finally:
                server.stop()
    except RuntimeError as e:
        print(f"stopped: {e}", file=sys.stderr)
    print("\n| server | concurrency | requests/s | p50 ms | p95 ms | p99 ms |\n|---|---:|---:|---:|---:|---:|")
    for (name, c), r in results.items():
        print(f"| {name} | {c} | {r['throughput']:.2f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} |")
    batched, unbatched = list(settings)
    top = max(args.concurrency)
    if (batched, top) in results and (unbatched, top) in results and results[(unbatched, top)]["throughput"]:
        ratio = results[(batched, top)]["throughput"] / results[(unbatched, top)]["throughput"]
        print(f"\nthroughput ratio at concurrency {top} (batched / unbatched): {ratio:.2f}x")
    else:
        print(f"\nthroughput ratio at concurrency {top}: not measured (time limit {args.time_limit:.0f} s)")


if __name__ == "__main__":
    main()
