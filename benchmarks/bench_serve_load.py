"""Load run of `vlmkit serve`: many concurrent clients, 5% malformed requests, then batching on vs off.

Bounded and loopback only: it starts the server itself (`python -m vlmkit serve` on 127.0.0.1, a
free port), sends a fixed number of requests and stops both. Part 1 sends `--requests` requests
(default 10,000) from `--clients` concurrent asyncio + httpx clients, 5% of them malformed (bad
JSON, wrong types, corrupt images, huge images, unknown model), and checks that no response is a
5xx, that every malformed one is a 4xx with a JSON error, and that no body shows a traceback or a
file path; it reports p50/p99 latency, requests/s and the server's RSS at start and end. Part 2
measures embedding throughput (one image, or one text, per request) of the same server with
batching against a second server started with --no-batching, in alternating rounds, side by side.

    .venv/bin/python benchmarks/bench_serve_load.py [--model RUN] [--requests 10000] [--clients 64]

Without --model it serves an untrained clip-tiny (ViT, 64 px images) saved to a temporary folder:
throughput does not depend on the weights. Prints one JSON object per part and a summary.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
# What must never appear in a response body: a Python traceback or a file-system path of the server.
LEAKS = re.compile(r"Traceback|File \"|\.py\b|/tmp/|/home/|/usr/|/work/|site-packages")


def tiny_run(folder: Path) -> str:
    """An untrained clip-tiny (ViT, 64 px) with a small tokenizer and its transform, saved as a run folder."""
    import torch

    from vlmkit.data.transforms import ImageTransform
    from vlmkit.models.registry import get_family, named_config
    from vlmkit.tokenizers import train_clip_bpe

    family, config = named_config("clip-tiny")
    cls = get_family(family)
    tokenizer = train_clip_bpe(["a red circle", "a blue square", "a green triangle", "a yellow star"] * 10, vocab_size=600,
                               context_length=32)
    config = cls.adapt_config_to_tokenizer(config, tokenizer)
    torch.manual_seed(0)
    model = cls.from_config_dict(config)
    model.tokenizer, model.transform = tokenizer, ImageTransform(config["vision"]["image_size"])
    model.save_pretrained(folder)
    return str(folder)


def png(width: int, height: int, seed: int) -> str:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def bomb_png(width: int = 50_000, height: int = 50_000) -> str:
    """A PNG of a few bytes whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return base64.b64encode(raw).decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python -m vlmkit serve` in a subprocess on a free loopback port."""

    def __init__(self, run: str, batching: bool, threads: int, onednn: str = "auto") -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "vlmkit", "serve", "--model", f"m={run}", "--host", "127.0.0.1", "--port", str(self.port),
                   "--max-concurrency", "4096", "--timeout", "120", "--onednn", onednn] + ([] if batching else ["--no-batching"])
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                httpx.get(self.url + "/healthz", timeout=2)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start in time")
                time.sleep(0.2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def mixed_requests(count: int, seed: int) -> list[tuple[str, str, bytes | None, bool]]:
    """(method, path, body, malformed) for the load run: 95% valid, 5% malformed, shuffled."""
    rng = random.Random(seed)
    images = [png(rng.randrange(40, 120), rng.randrange(40, 120), seed=i) for i in range(32)]
    corrupt = base64.b64encode(os.urandom(300)).decode()
    truncated = base64.b64encode(base64.b64decode(png(80, 80, 1))[:-40]).decode()
    bomb = bomb_png()
    words = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "star", "small", "large"]
    bad = [
        ("POST", "/v1/embed", b'{"texts": ["a red circle"', True),  # bad JSON
        ("POST", "/v1/classify", json.dumps({"image": images[0], "labels": "circle"}).encode(), True),  # wrong type
        ("POST", "/v1/embed", json.dumps({"texts": [1, 2]}).encode(), True),
        ("POST", "/v1/embed", json.dumps({"images": [corrupt]}).encode(), True),  # corrupt image
        ("POST", "/v1/embed", json.dumps({"images": [truncated]}).encode(), True),
        ("POST", "/v1/embed", json.dumps({"images": [bomb]}).encode(), True),  # huge image
        ("POST", "/v1/caption", json.dumps({"model": "nope", "image": images[1]}).encode(), True),  # unknown model
        ("POST", "/v1/embed", json.dumps({"model": "nope", "texts": ["a"]}).encode(), True),
    ]
    out = []
    for number in range(count):
        if number % 20 == 0:  # 5%
            out.append(bad[(number // 20) % len(bad)])
            continue
        kind = rng.random()
        if kind < 0.4:
            body = {"texts": [" ".join(rng.choices(words, k=rng.randrange(2, 6))) for _ in range(rng.randrange(1, 4))]}
            out.append(("POST", "/v1/embed", json.dumps(body).encode(), False))
        elif kind < 0.75:
            out.append(("POST", "/v1/embed", json.dumps({"images": [rng.choice(images)]}).encode(), False))
        elif kind < 0.95:
            body = {"image": rng.choice(images), "labels": rng.sample(words, rng.randrange(2, 6))}
            out.append(("POST", "/v1/classify", json.dumps(body).encode(), False))
        else:
            out.append(("GET", "/v1/models", None, False))
    rng.shuffle(out)
    return out


class Connection:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams (Content-Length bodies only).

    The load generator must not be what is measured: on the 2-core machine the numbers below come
    from, httpx's AsyncClient tops out near 60 requests/s with 64 connections (the server answers
    /healthz ~2,700/s to this client), so httpx serves the set-up calls and this sends the load.
    """

    def __init__(self, port: int) -> None:
        self.port, self.reader, self.writer = port, None, None

    async def request(self, method: str, path: str, body: bytes | None) -> tuple[int, str]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        body = body or b""
        head = (f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        header = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(header[0].split()[1])
        fields = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in header[1:] if ":" in line}
        text = (await self.reader.readexactly(int(fields.get("content-length", "0")))).decode("utf-8", "replace")
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status, text

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def drive(url: str, requests: list, clients: int) -> list[tuple[int, float, bool, str]]:
    """Send `requests` from `clients` concurrent connections; (status, seconds, malformed, body) each."""
    port = int(url.rsplit(":", 1)[1])
    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    results = []

    async def worker():
        connection = Connection(port)
        try:
            while not queue.empty():
                method, path, body, malformed = queue.get_nowait()
                started = time.perf_counter()
                # Bounded: a request that gets no answer in 120 s ends the run with an error.
                status, text = await asyncio.wait_for(connection.request(method, path, body), 120)
                results.append((status, time.perf_counter() - started, malformed, text))
        finally:
            await connection.close()

    await asyncio.gather(*[worker() for _ in range(clients)])
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load_part(run: str, args) -> dict:
    server = Server(run, batching=True, threads=args.threads, onednn=args.onednn)
    try:
        server.wait_ready()
        asyncio.run(drive(server.url, mixed_requests(200, seed=99), args.clients))  # warm-up: every code path once
        rss = [server.rss_mb()]
        requests = mixed_requests(args.requests, seed=0)
        results, seconds, chunk = [], 0.0, max(1, len(requests) // 5)
        for start in range(0, len(requests), chunk):  # five slices, the server's RSS after each
            started = time.perf_counter()
            results += asyncio.run(drive(server.url, requests[start:start + chunk], args.clients))
            seconds += time.perf_counter() - started
            rss.append(server.rss_mb())
        metrics = __import__("httpx").get(server.url + "/metrics").text
    finally:
        server.stop()
    statuses: dict[str, int] = {}
    for status, _, _, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    leaks = [body[:200] for _, _, _, body in results if LEAKS.search(body)]
    malformed_not_4xx = sum(1 for status, _, malformed, _ in results if malformed and not 400 <= status < 500)
    valid_not_200 = sum(1 for status, _, malformed, _ in results if not malformed and status != 200)
    non_json_errors = sum(1 for status, _, _, body in results if status >= 400 and not body.startswith('{"error":'))
    latencies = [seconds for _, seconds, _, _ in results]
    batches = [int(n) for n in re.findall(r'vlmkit_batch_size_count\{[^}]*\} (\d+)', metrics)]
    served = [float(n) for n in re.findall(r'vlmkit_batch_size_sum\{[^}]*\} ([\d.]+)', metrics)]
    return {
        "part": "load", "requests": len(results), "malformed": sum(1 for r in results if r[2]), "clients": args.clients,
        "statuses": statuses, "5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "malformed_not_4xx": malformed_not_4xx, "valid_not_200": valid_not_200, "non_json_errors": non_json_errors,
        "bodies_with_traceback_or_path": len(leaks), "leak_examples": leaks[:3],
        "p50_ms": round(1000 * percentile(latencies, 0.5), 1), "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
        "requests_per_s": round(len(results) / seconds, 1), "seconds": round(seconds, 1),
        "rss_start_mb": round(rss[0], 1), "rss_end_mb": round(rss[-1], 1), "rss_mb_after_each_fifth": [round(r, 1) for r in rss[1:]],
        # Growth once warm (after the first fifth): what "flat" is judged by; the first fifth fills caches and arenas.
        "rss_growth_after_first_fifth_mb": round(rss[-1] - rss[1], 1),
        "model_calls": sum(batches), "requests_per_model_call": round(sum(served) / max(1, sum(batches)), 2),
    }


def throughput_part(run: str, args) -> dict:
    """Embedding requests/s (one image, or one text, per request) with batching vs without, alternating rounds."""
    images = [png(64, 64, seed=i) for i in range(64)]
    words = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "star", "small", "large", "left", "right"]
    rng = random.Random(1)
    kinds = {
        "images": [("POST", "/v1/embed", json.dumps({"images": [images[i % 64]]}).encode(), False) for i in range(args.embed_requests)],
        "texts": [("POST", "/v1/embed", json.dumps({"texts": [" ".join(rng.choices(words, k=6))]}).encode(), False)
                  for _ in range(args.embed_requests)],
    }
    rounds = {(kind, side): [] for kind in kinds for side in ("batching", "no_batching")}
    servers = {"batching": Server(run, True, args.threads, args.onednn), "no_batching": Server(run, False, args.threads, args.onednn)}
    try:
        for server in servers.values():
            server.wait_ready()
            for requests in kinds.values():
                asyncio.run(drive(server.url, requests[:200], args.clients))  # warm-up
        for _ in range(args.rounds):  # alternating rounds: machine noise hits both sides
            for kind, requests in kinds.items():
                for side, server in servers.items():
                    started = time.perf_counter()
                    results = asyncio.run(drive(server.url, requests, args.clients))
                    elapsed = time.perf_counter() - started
                    assert all(status == 200 for status, _, _, _ in results), "an embedding request failed"
                    rounds[(kind, side)].append(len(results) / elapsed)
    finally:
        for server in servers.values():
            server.stop()
    out = {"part": "embedding_throughput", "requests_per_round": args.embed_requests, "clients": args.clients, "rounds": args.rounds}
    for kind in kinds:
        on, off = statistics.median(rounds[(kind, "batching")]), statistics.median(rounds[(kind, "no_batching")])
        out[kind] = {"per_s_batching": round(on, 1), "per_s_no_batching": round(off, 1), "speedup": round(on / off, 2),
                     "rounds_batching": [round(v, 1) for v in rounds[(kind, "batching")]],
                     "rounds_no_batching": [round(v, 1) for v in rounds[(kind, "no_batching")]]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="run folder to serve (default: an untrained clip-tiny)")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--embed-requests", type=int, default=2000, help="embedding requests per throughput round and kind")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server (OMP_NUM_THREADS)")
    parser.add_argument("--onednn", choices=("auto", "on", "off"), default="auto", help="the servers' --onednn")
    args = parser.parse_args()
    sys.path.insert(0, SRC)
    with tempfile.TemporaryDirectory() as folder:
        run = args.model or tiny_run(Path(folder) / "clip-tiny")
        load = load_part(run, args)
        print(json.dumps(load), flush=True)
        speed = throughput_part(run, args)
        print(json.dumps(speed), flush=True)
    ok = load["5xx"] == 0 and load["bodies_with_traceback_or_path"] == 0 and load["malformed_not_4xx"] == 0 \
        and load["valid_not_200"] == 0 and load["non_json_errors"] == 0
    print(f"summary: {load['requests']} requests ({load['malformed']} malformed) from {load['clients']} clients: "
          f"{load['5xx']} 5xx, {load['bodies_with_traceback_or_path']} bodies with a traceback or path, "
          f"p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms, {load['requests_per_s']} requests/s, "
          f"RSS {load['rss_start_mb']} -> {load['rss_end_mb']} MB; embedding with vs without batching: "
          + "; ".join(f"{kind} {speed[kind]['per_s_batching']} vs {speed[kind]['per_s_no_batching']}/s ({speed[kind]['speedup']}x)"
                      for kind in ("images", "texts"))
          + ("" if ok else "  FAILED CHECKS"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
