"""`score_captions` leaves the caller's process exactly as it found it.

A library call must not tune the process it runs in: no paused or disabled garbage collector,
no allocator tuning, no threads, files, child processes or exit handlers left behind, no
changed environment. Worker threads that are joined before the call returns are fine.
"""
from __future__ import annotations

import atexit
import gc
import json
import locale
import os
import shutil
import signal
import subprocess
import sys
import threading
import warnings
import weakref

import numpy as np
import pytest

from vlmkit.errors import UserError
from vlmkit.metrics import caption, ngrams
from vlmkit.metrics.caption import score_captions
from vlmkit.metrics.synthetic import random_corpus


def _children() -> list[int]:
    """Process ids whose parent is this process (Linux; empty elsewhere)."""
    me, children = os.getpid(), []
    if not os.path.isdir("/proc"):
        return children
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            if int(fields[1]) == me:
                children.append(int(name))
    return sorted(children)


def _process_state() -> dict:
    state = {
        "gc enabled": gc.isenabled(),
        "gc thresholds": gc.get_threshold(),
        "gc debug flags": gc.get_debug(),
        "gc frozen objects": gc.get_freeze_count(),
        "gc callbacks": list(gc.callbacks),
        "thread count": threading.active_count(),
        "threads": sorted(thread.ident for thread in threading.enumerate()),
        "environment": dict(os.environ),
        "working directory": os.getcwd(),
        "switch interval": sys.getswitchinterval(),
        "recursion limit": sys.getrecursionlimit(),
        "numpy error handling": np.geterr(),
        "locale": locale.setlocale(locale.LC_ALL),  # (a query: no second argument)
        "signal handlers": {int(sig): signal.getsignal(sig) for sig in signal.valid_signals()
                            if sig not in (signal.SIGKILL, signal.SIGSTOP)},
        "warning filters": list(warnings.filters),
        "child processes": _children(),
    }
    if hasattr(atexit, "_ncallbacks"):  # CPython
        state["exit handlers"] = atexit._ncallbacks()
    if os.path.isdir("/proc/self/fd"):
        state["open file descriptors"] = sorted(os.listdir("/proc/self/fd"))
    return state


@pytest.fixture()
def corpus():
    return random_corpus(300, 5, seed=3, tricky=0.3)


@pytest.mark.parametrize("cores", [1, 2])
def test_score_captions_leaves_the_process_as_it_found_it(cores, corpus, monkeypatch):
    """Process-wide state is the same after a call (successful or not) as before it, with and
    without the second core (worker threads for ROUGE-L and the sort), and the collector is
    never paused during the call either."""
    monkeypatch.setattr(ngrams, "CORES", cores)
    monkeypatch.setattr(ngrams, "_PARALLEL_SORT_MIN", 10)  # the two-thread sort on this small set
    predictions, references = corpus
    seen_during_call = []
    tokenize = caption.tokenize

    def watching_tokenize(*args, **kwargs):
        seen_during_call.append((gc.isenabled(), gc.get_threshold()))
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(caption, "tokenize", watching_tokenize)
    before = _process_state()
    result = score_captions(predictions, references, per_image=True)
    assert _process_state() == before
    assert result["n"] == 300 and result["CIDEr"] > 0.1
    assert seen_during_call == [(before["gc enabled"], before["gc thresholds"])] * 2
    with pytest.raises(UserError):
        score_captions({1: "a dog"}, {2: ["a dog"]})
    assert _process_state() == before


def test_score_captions_keeps_a_callers_garbage_collector_settings(corpus):
    """A caller's disabled collector or own thresholds stay as they are."""
    predictions, references = corpus
    thresholds = gc.get_threshold()
    gc.disable()
    gc.set_threshold(5000, 20, 30)
    try:
        score_captions(predictions, references)
        assert not gc.isenabled() and gc.get_threshold() == (5000, 20, 30)
    finally:
        gc.set_threshold(*thresholds)
        gc.enable()


class _Placeholder:
    pass


@pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")
def test_score_captions_with_meteor_leaves_no_process_thread_file_or_exit_handler(corpus):
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (test extra) provides meteor-1.5.jar")
    predictions, references = corpus
    small = {key: predictions[key] for key in list(predictions)[:20]}
    small_refs = {key: references[key] for key in small}
    # the standard library registers one exit hook for all `weakref.finalize` objects, the
    # first time any is made (a Meteor holds one): make that first one here
    weakref.finalize(_Placeholder(), lambda: None)
    before = _process_state()
    result = score_captions(small, small_refs, metrics=("bleu", "rouge", "cider", "meteor"))
    assert 0 < result["METEOR"] < 1
    assert _process_state() == before


# Run in a fresh interpreter (the test process's allocator state depends on the tests before):
# find glibc's current mmap threshold by allocating ever larger arrays until one is mmap-ed
# (mallinfo2's count of mmap-ed blocks grows while it lives), score a small corpus, then check
# that an array of twice that size is still mmap-ed, i.e. that the call did not raise the
# threshold (as freeing an untouched 32 MiB block, or mallopt, would).
_ALLOCATOR_PROBE = r"""
import ctypes, json, sys
import numpy as np
from vlmkit.metrics.caption import score_captions

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2

def mmapped(size):
    before = mallinfo2().hblks
    block = np.ones(size, dtype=np.uint8)
    return mallinfo2().hblks > before

size = 1 << 20
while not mmapped(size):
    size *= 2
predictions, references = json.loads(sys.argv[1])
score_captions(predictions, references, per_image=True)
print(json.dumps({"size": size, "still_mmapped": mmapped(2 * size)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator is probed on Linux")
def test_score_captions_leaves_the_allocator_thresholds_alone():
    try:
        import ctypes

        ctypes.CDLL(None).mallinfo2
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            raise AttributeError
    except (AttributeError, ValueError, OSError):
        pytest.skip("not glibc 2.33 or later (no mallinfo2)")
    predictions = {"1": "A man riding a horse.", "2": "Two dogs play, in the park."}
    references = {"1": ["A man rides a horse.", "Someone on a horse."], "2": ["Dogs playing.", "two dogs"]}
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    environment.pop("MALLOC_MMAP_THRESHOLD_", None)  # a fixed threshold would hide a change
    environment.pop("MALLOC_TRIM_THRESHOLD_", None)
    output = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE, json.dumps([predictions, references])],
                            capture_output=True, text=True, env=environment, check=True).stdout
    probe = json.loads(output)
    assert probe["size"] < 16 << 20, probe  # the threshold was found below glibc's 32 MiB cap
    assert probe["still_mmapped"], f"score_captions raised glibc's mmap threshold above {2 * probe['size']} bytes"
