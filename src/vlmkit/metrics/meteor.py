"""METEOR 1.5 through the `meteor-1.5.jar` that pycocoevalcap ships (the only Java dependency).

One long-lived JVM per `Meteor` object, started with the en-US locale forced (the jar parses
and prints decimals with the JVM's locale and breaks on comma-decimal locales), fed PTB-tokenized
text over stdin exactly as pycocoevalcap does, and closed by `close()`, a `with` block, or at
interpreter exit. The corpus score is the jar's score over aggregated statistics, not a mean of
image scores.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import weakref

from vlmkit.errors import UserError


def find_meteor_jar() -> str:
    """Path of pycocoevalcap's meteor-1.5.jar, or a UserError saying what to install."""
    try:
        import pycocoevalcap.meteor as package  # type: ignore
    except ImportError:
        package = None
    if package is not None:
        for folder in list(getattr(package, "__path__", [])):
            jar = os.path.join(folder, "meteor-1.5.jar")
            if os.path.isfile(jar):
                return jar
    raise UserError("METEOR needs meteor-1.5.jar from pycocoevalcap; install it with "
                    "'pip install pycocoevalcap==1.2' or leave 'meteor' out of --metrics")


def find_java() -> str:
    """Path of the `java` executable, or a UserError saying what to install."""
    java = shutil.which("java")
    if java is None:
        raise UserError("METEOR needs Java (the 'java' command was not found on PATH); install a "
                        "Java runtime (e.g. 'apt-get install default-jre') or leave 'meteor' out of --metrics")
    return java


class Meteor:
    """A METEOR scorer backed by one JVM; thread-safe; use as a context manager or call close()."""

    def __init__(self, memory: str = "2G"):
        java, jar = find_java(), find_meteor_jar()
        command = [java, "-Duser.language=en", "-Duser.country=US", "-Dfile.encoding=UTF-8",
                   f"-Xmx{memory}", "-jar", jar, "-", "-", "-stdio", "-l", "en", "-norm"]
        environment = dict(os.environ, LC_ALL="en_US.UTF-8", LANG="en_US.UTF-8")
        self._process = subprocess.Popen(command, cwd=os.path.dirname(jar), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=environment)
        self._lock = threading.Lock()
        # close the JVM even if the caller forgets to: when the object is collected, or at
        # interpreter exit (a finalizer runs then while alive; registering it with `atexit` as
        # well would leave one entry behind in the process per Meteor object)
        self._finalizer = weakref.finalize(self, _terminate, self._process)

    def _ask(self, line: str) -> str:
        self._process.stdin.write((line + "\n").encode("utf-8"))
        self._process.stdin.flush()
        answer = self._process.stdout.readline()
        if not answer:
            raise RuntimeError("the METEOR process ended unexpectedly")
        return answer.decode("utf-8").strip()

    def compute_score(self, hypotheses: list[str], references: list[list[str]]) -> tuple[float, list[float]]:
        """Corpus METEOR and per-image scores for tokenized hypotheses and references."""
        with self._lock:
            if self._process.poll() is not None:
                raise RuntimeError("the METEOR process is closed")
            stats = []
            for hypothesis, refs in zip(hypotheses, references):
                hypothesis = hypothesis.replace("|||", "").replace("  ", " ")
                stats.append(self._ask(" ||| ".join(["SCORE", " ||| ".join(refs), hypothesis])))
            self._process.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode("utf-8"))
            self._process.stdin.flush()
            per_image = [float(self._process.stdout.readline().strip()) for _ in stats]
            corpus = float(self._process.stdout.readline().strip())
        return corpus, per_image

    def close(self) -> None:
        """Stop the JVM (idempotent)."""
        self._finalizer()

    def __enter__(self) -> "Meteor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _terminate(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    process.stdout.close()  # the pipe's descriptor goes now, not whenever the object is collected
