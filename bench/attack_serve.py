"""Attack: many clients sending small files that decode huge (6300 x 6300 PNGs, 8- or 16-bit) to `serve`.

Starts ``cli.py serve`` of --project (default: this checkout; pass another checkout to compare) on a free
localhost port, then --clients threads each POST one such PNG at once, --bursts times. While they run,
samples the server's RSS (/proc/PID/status) every 50 ms and times GET /health; prints the peak RSS, the
RSS after each burst, the slowest /health, and the status codes. Without --model it first fits the
issue's small set-up (3 classes x 12 generated JPEGs, resnet18 with --weights none, the default head) in
a temporary folder.

    python bench/attack_serve.py --clients 32 --bits 8 --json-out attack-8bit.json
    python bench/attack_serve.py --clients 32 --bits 16 --project /path/to/an/older/checkout

``--attack slow-headers`` (slowloris) instead opens --clients connections that send a request's headers a
byte every --trickle-s, for --hold-s, against a server allowed --server-fds file descriptors (so that a few
hundred connections can exhaust them); prints how many the server closed and after how long, its open
descriptors over time, and how /health fared meanwhile:

    python bench/attack_serve.py --attack slow-headers --clients 300 --server-fds 256 --hold-s 30

Not a test: figures move with the machine (say when it was shared).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_serve import free_port, wait_healthy  # the same folder: the one way to start and wait for serve

ROOT = Path(__file__).resolve().parents[1]


def huge_png(side: int, bits: int) -> bytes:
    """A side x side gray PNG of a few blocks: about 100 KB of file, side**2 pixels to decode."""
    from PIL import Image

    top = 65535 if bits == 16 else 255
    arr = np.zeros((side, side), np.uint16 if bits == 16 else np.uint8)
    for k in range(8):
        arr[k * side // 8:(k + 1) * side // 8, : side // (k + 2)] = top * (k + 1) // 9
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def small_head(folder: Path, project: Path) -> str:
    """The issue's set-up: 3 classes x 12 generated JPEGs, resnet18 --weights none, fit-head's default head."""
    code = f"""
import sys; sys.path.insert(0, {str(project)!r})
from pathlib import Path
from tests.conftest import make_image_folder
from pipeline.extraction.extract import ExtractConfig, extract
from pipeline.heads.fit_head import FitHeadConfig, fit_head
d = make_image_folder(Path({str(folder / 'd')!r}), per_class=12, classes=('blue', 'green', 'red'))
cache = extract(ExtractConfig(data=str(d), n=0, backbone='resnet18', weights='none', cache_dir={str(folder / 'f')!r}))
print(fit_head(FitHeadConfig(cache=cache.cache, runs_dir={str(folder / 'r')!r})).checkpoint)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_limit(fds: int):
    """The serve process's preexec_fn: at most ``fds`` open files (0: the inherited limit)."""
    def limit():
        if fds:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fds, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return limit


def slow_headers(url: str, proc: subprocess.Popen, args) -> dict:
    """Slowloris: --clients connections each sending its headers a byte every --trickle-s for --hold-s, /health
    probed every 0.2 s meanwhile. A connection is closed by the server when it reads an answer or EOF there."""
    import httpx

    port = int(url.rsplit(":", 1)[1])
    line = b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"X-Padding: " + b"a" * 10_000
    opened, refused, lifetimes, answers, fds, health = {}, 0, [], {}, [], []
    started = time.monotonic()
    for _ in range(args.clients):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.setblocking(False)
            opened[s] = (time.monotonic(), 0)
        except OSError:
            refused += 1
    running = threading.Event()
    running.set()

    def probe():
        while running.is_set():
            t0 = time.perf_counter()
            try:
                health.append(("ok" if httpx.get(f"{url}/health", timeout=5).status_code == 200 else "error",
                               time.perf_counter() - t0))
            except httpx.TransportError as e:
                health.append((type(e).__name__, time.perf_counter() - t0))
            time.sleep(0.2)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        while time.monotonic() - started < args.hold_s:
            fds.append(open_fds(proc.pid))
            for s, (at, sent) in list(opened.items()):
                closed = bool(select.select([s], [], [], 0)[0])
                if not closed:
                    try:
                        s.send(line[sent:sent + 1])
                        opened[s] = (at, sent + 1)
                    except OSError:
                        closed = True
                if closed:
                    with contextlib.suppress(OSError):
                        first = s.recv(100).split(b"\r\n")[0].decode(errors="replace") or "EOF"
                        answers[first] = answers.get(first, 0) + 1
                    lifetimes.append(time.monotonic() - at)
                    s.close()
                    del opened[s]
            time.sleep(args.trickle_s)
    finally:
        running.clear()
        prober.join()
        for s in opened:
            s.close()
    ok = [t for status, t in health if status == "ok"]
    lifetimes.sort()
    return {"attack": "slow-headers", "clients": args.clients, "server_fds": args.server_fds or "inherited",
            "hold_s": args.hold_s, "trickle_s": args.trickle_s, "connect_refused": refused,
            "closed_by_server": len(lifetimes), "still_open_at_end": len(opened),
            "lifetime_median_s": round(lifetimes[len(lifetimes) // 2], 1) if lifetimes else None,
            "lifetime_max_s": round(lifetimes[-1], 1) if lifetimes else None, "their_answers": answers,
            "server_fds_peak": max(fds, default=0), "server_fds_last": fds[-1] if fds else None,
            "health_ok": len(ok), "health_failed": len(health) - len(ok),
            "health_failures": {k: [st for st, _ in health].count(k) for k in {st for st, _ in health} - {"ok"}},
            "health_max_s": round(max(ok, default=0), 3),
            "health_ok_last_5s": sum(1 for st, _ in health[-25:] if st == "ok")}


def attack(args) -> dict:
    import httpx

    project = Path(args.project).resolve()
    with tempfile.TemporaryDirectory(prefix="attack-serve-") as tmp:
        model = args.model or small_head(Path(tmp), project)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(project)}
        proc = subprocess.Popen([sys.executable, "cli.py", "-q", "serve", "--model", model, "--port", str(port),
                                 "--precision", "fp32", "--max-queue", str(max(256, args.clients))],
                                cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=fd_limit(args.server_fds))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
            if args.attack == "slow-headers":
                return {"project": str(project), **slow_headers(url, proc, args)}
            idle = rss_kb(proc.pid)
            data = huge_png(args.side, args.bits)
            samples, health, statuses, after = [], [], [], []
            running = threading.Event()

            def sample():
                while running.is_set():
                    samples.append(rss_kb(proc.pid))
                    time.sleep(0.05)

            def probe():
                while running.is_set():
                    t0 = time.perf_counter()
                    try:
                        httpx.get(f"{url}/health", timeout=60)
                        health.append(time.perf_counter() - t0)
                    except httpx.TransportError:
                        health.append(float("inf"))
                    time.sleep(0.2)

            def client():
                try:
                    r = httpx.post(f"{url}/predict", files=[("files", ("huge.png", data, "image/png"))], timeout=300)
                    statuses.append(r.status_code)
                except httpx.TransportError as e:
                    statuses.append(type(e).__name__)

            for _ in range(args.bursts):
                running.set()
                watchers = [threading.Thread(target=sample), threading.Thread(target=probe)]
                clients = [threading.Thread(target=client) for _ in range(args.clients)]
                for t in watchers + clients:
                    t.start()
                for t in clients:
                    t.join()
                running.clear()
                for t in watchers:
                    t.join()
                time.sleep(1.0)
                after.append(rss_kb(proc.pid))
            peak = rss_kb(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(60)
    counts = {str(s): statuses.count(s) for s in sorted(set(statuses), key=str)}
    return {"project": str(project), "clients": args.clients, "bursts": args.bursts, "bits": args.bits,
            "side": args.side, "file_kb": round(len(data) / 1024, 1), "idle_rss_gb": round(idle / 1e6, 2),
            "peak_rss_gb": round(max(peak, max(samples, default=0)) / 1e6, 2),
            "rss_after_each_burst_gb": [round(a / 1e6, 2) for a in after],
            "health_max_s": round(max(health, default=0), 3),
            "health_median_s": round(sorted(health)[len(health) // 2], 3) if health else None, "statuses": counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a head.pt or model.pt [default: the issue's small resnet18 head, fitted now]")
    p.add_argument("--project", default=str(ROOT), help="the checkout whose cli.py serves [default: this one]")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--bursts", type=int, default=2)
    p.add_argument("--bits", type=int, choices=(8, 16), default=8)
    p.add_argument("--side", type=int, default=6300)
    p.add_argument("--attack", choices=("huge-png", "slow-headers"), default="huge-png")
    p.add_argument("--trickle-s", type=float, default=1.0, help="slow-headers: seconds between a client's bytes")
    p.add_argument("--hold-s", type=float, default=30.0, help="slow-headers: how long the attack lasts")
    p.add_argument("--server-fds", type=int, default=0,
                   help="the server's open-file limit (slow-headers: a low one is exhausted by a few hundred "
                        "connections) [default: inherited]")
    p.add_argument("--json-out")
    args = p.parse_args()
    result = attack(args)
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
