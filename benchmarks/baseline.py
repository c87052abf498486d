"""Load a module of ctxseg as it was at an earlier git revision, next to the current one, so that a
benchmark can time both side by side in one process (``--baseline REV``).

Only the named module's own source is taken from the revision; what it imports comes from the
current tree (so the module must still fit it)."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_module_at(rev: str, relpath: str):
    """The module at ``relpath`` (e.g. ``ctxseg/methods/pixel_contrast.py``) as of git revision
    ``rev``, imported under a private name."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{relpath}"], capture_output=True, text=True,
                         check=True).stdout
    name = f"_baseline_{rev}_{relpath.removesuffix('.py').replace('/', '_')}".replace("-", "_").replace("~", "_")
    spec = importlib.util.spec_from_loader(name, loader=None, origin=f"{rev}:{relpath}")
    module = importlib.util.module_from_spec(spec)
    module.__file__ = f"{rev}:{relpath}"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(src, module.__file__, "exec"), module.__dict__)
    return module


def class_at(rev: str, cls: type):
    """``cls`` as defined at git revision ``rev`` (from its module's source at that revision)."""
    relpath = Path(inspect.getsourcefile(cls)).resolve().relative_to(ROOT).as_posix()
    return getattr(load_module_at(rev, relpath), cls.__name__)


def short(rev: str) -> str:
    """The abbreviated commit id of ``rev``."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                          check=True).stdout.strip()


class TreeWorker:
    """A process that imports ctxseg from git revision ``rev`` (exported into a temporary folder:
    the whole package as it was, model and data included) and runs ``benchmarks/_tree_step.py``
    there: it builds the training step ``setup`` describes and times one step each time
    ``step()`` asks, so that a benchmark can interleave the old package's steps with the current
    one's in one run."""

    def __init__(self, rev: str, setup: dict):
        import json
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix=f"ctxseg-{short(rev)}-")
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "ctxseg"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", self.tmp.name], input=archive, check=True)
        env = {**__import__("os").environ, "PYTHONPATH": self.tmp.name}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "_tree_step.py"), json.dumps(setup)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=self.tmp.name)
        ready = self.proc.stdout.readline().strip()
        if not ready.startswith("ready"):
            raise RuntimeError(f"the baseline worker at {rev} did not start: {ready!r}")
        self.origin = ready.split(" ", 1)[1]

    def step(self) -> float:
        """One training step in the worker; returns its seconds as the worker timed them."""
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.tmp.cleanup()
