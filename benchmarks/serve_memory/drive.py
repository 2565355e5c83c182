"""Where the server's memory goes under the load mix: after every 2,000 requests, SIGUSR1 makes the server
(probe_server.py) write tracemalloc / allocated-blocks / glibc mallinfo2 figures and a snapshot to OUT.

    PROBE_TRACE=0|1 [PROBE_MIX=mixed|healthz|texts|images|invalid] [PROBE_TRIM=1] \
        .venv/bin/python benchmarks/serve_memory/drive.py OUT [REQUESTS] [extra vlmkit serve options]

PROBE_MIX keeps only one kind of request of the load mix (to tell which serving path holds memory);
PROBE_TRIM=1 also records the RSS after glibc's malloc_trim(0) at each snapshot (what is free heap).
Extra options go to `vlmkit serve`: `--onednn on` serves as before 2026-12-07 (oneDNN's per-shape
primitives, RSS 422 -> 480 MB over 40,000 requests), the default `auto` is flat (362 -> 376 MB).

Diff two snapshots with tracemalloc.Snapshot.load(...).compare_to(..., "traceback").
"""
import asyncio, json, os, signal, subprocess, sys, tempfile, time
from pathlib import Path
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent)); sys.path.insert(0, str(HERE.parents[1] / "src"))
import bench_serve_load as b  # noqa: E402
out = Path(sys.argv[1]); out.mkdir(exist_ok=True)
total = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
with tempfile.TemporaryDirectory() as folder:
    run = b.tiny_run(Path(folder) / "clip-tiny")
    port = b.free_port()
    env = {**os.environ, "PYTHONPATH": b.SRC, "OMP_NUM_THREADS": "1", "PROBE_DIR": str(out), "PROBE_SRC": b.SRC}
    p = subprocess.Popen([sys.executable, str(HERE / "probe_server.py"), "serve", "--model", f"m={run}", "--port", str(port),
                          "--max-concurrency", "4096", "--timeout", "300"] + sys.argv[3:], env=env, stderr=open(out / "server.log", "w"))
    server = b.Server.__new__(b.Server); server.process, server.port, server.url = p, port, f"http://127.0.0.1:{port}"
    server.wait_ready(900)
    asyncio.run(b.drive(server.url, b.mixed_requests(200, seed=99), 64))
    reqs = b.mixed_requests(total, seed=0)
    mix = os.environ.get("PROBE_MIX", "mixed")
    if mix != "mixed":
        pool = {"healthz": [("GET", "/healthz", None, False)],
                "texts": [r for r in reqs[:2000] if r[1] == "/v1/embed" and b'"texts"' in (r[2] or b"") and not r[3]],
                "images": [r for r in reqs[:2000] if r[1] == "/v1/embed" and b'"images"' in (r[2] or b"") and not r[3]],
                "invalid": [r for r in reqs[:2000] if r[3]]}[mix]
        reqs = [pool[i % len(pool)] for i in range(total)]
    chunk = 2000; n = 0
    for start in range(0, total, chunk):
        t = time.perf_counter()
        res = asyncio.run(b.drive(server.url, reqs[start:start+chunk], 64))
        n += len(res)
        bad = sum(1 for s, *_ in res if s >= 500)
        f = out / f"snap{start//chunk+1}.json"
        p.send_signal(signal.SIGUSR1)
        while not f.exists(): time.sleep(0.2)
        time.sleep(0.5)
        st = json.load(open(out / f"snap{start//chunk+1}.json"))
        print(n, f"{len(res)/(time.perf_counter()-t):.0f}/s 5xx={bad}", {k: (round(v,1) if isinstance(v,float) else v) for k, v in st.items() if k != "types"}, flush=True)
    p.terminate(); p.wait()
