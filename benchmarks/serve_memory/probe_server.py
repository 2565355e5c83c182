"""Run `vlmkit serve` with tracemalloc (PROBE_TRACE=1); SIGUSR1 writes a snapshot + stats to $PROBE_DIR/snapN.* (see drive.py)."""
import ctypes, gc, json, os, signal, sys, tracemalloc, collections, threading
if os.environ.get("PROBE_TRACE", "1") == "1":
    tracemalloc.start(int(os.environ.get("PROBE_FRAMES", "12")))
counter = [0]
libc = ctypes.CDLL("libc.so.6")
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena","ordblks","smblks","hblks","hblkhd","usmblks","fsmblks","uordblks","fordblks","keepcost")]
libc.mallinfo2.restype = MI2
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) / 1024
def dump(*_):
    import asyncio
    counter[0] += 1
    d = os.environ["PROBE_DIR"]
    gc.collect()
    mi = libc.mallinfo2()
    types = collections.Counter(type(o).__name__ for o in gc.get_objects())
    try:
        tasks = len(asyncio.all_tasks(asyncio.get_running_loop()))
    except RuntimeError:
        tasks = -1
    stats = {"rss_mb": rss(), "blocks": sys.getallocatedblocks(), "malloc_in_use_mb": mi.uordblks / 2**20,
             "malloc_free_mb": mi.fordblks / 2**20, "malloc_arena_mb": mi.arena / 2**20, "mmap_mb": mi.hblkhd / 2**20,
             "threads": threading.active_count(), "tasks": tasks, "types": types.most_common(40)}
    if tracemalloc.is_tracing():
        stats["traced_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
        tracemalloc.take_snapshot().dump(f"{d}/snap{counter[0]}.tm")
    if os.environ.get("PROBE_TRIM") == "1":  # how much of the RSS is free heap pages glibc could hand back
        libc.malloc_trim(0)
        stats["rss_after_trim_mb"] = rss()
    json.dump(stats, open(f"{d}/snap{counter[0]}.json", "w"))
signal.signal(signal.SIGUSR1, dump)
sys.path.insert(0, os.environ["PROBE_SRC"])
from vlmkit.cli import main
sys.exit(main(sys.argv[1:]))
