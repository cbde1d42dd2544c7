"""Running generated code (HumanEval, MBPP) without trusting it.

Each program runs in its own Python process (``python -I -B``), in a fresh temporary working directory, with:
- resource limits set before the program starts: address space (memory), CPU seconds, file size, core dumps;
- a wall-clock time limit, after which its whole process group is killed;
- an audit hook (PEP 578, which code cannot remove) installed before the program runs, refusing: network access,
  starting processes (fork, exec, subprocess, os.system — a fork bomb stops at its first fork), loading native code
  through ctypes, signalling other processes, and touching files outside the temporary directory (reading is allowed
  only there and in the Python installation; writing, deleting, renaming only there).
A hostile program fails (or times out) on its own; it cannot take the evaluation, or the user's files, with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

GUARD = r'''
import os, resource, sys
MEMORY, CPU = int(sys.argv[1]), int(sys.argv[2])
for limit, value in ((resource.RLIMIT_AS, MEMORY), (resource.RLIMIT_CPU, CPU), (resource.RLIMIT_FSIZE, 16 << 20),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
ROOT = os.path.realpath(os.getcwd())
READABLE = [ROOT] + sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                            sys.base_exec_prefix)}) + ["/dev/null", "/dev/urandom"]
DENIED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
          "pty.", "ctypes.", "os.kill", "os.killpg", "os.putenv", "os.unsetenv", "os.setuid", "os.setgid", "os.chroot",
          "resource.setrlimit", "signal.pthread_kill", "sys.remote_exec", "os.startfile", "webbrowser.")
PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.replace", "os.chmod", "os.chown", "os.truncate", "os.link",
               "os.symlink", "os.mkdir", "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.utime", "os.chdir"}
LISTING_EVENTS = {"os.listdir", "os.scandir", "glob.glob"}

def _inside(path, roots):
    try:
        real = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
    except (TypeError, ValueError):
        return False
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)

def _guard(event, args):
    if event.startswith(DENIED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        writing = (mode and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if not _inside(path, [ROOT] if writing else READABLE):
            raise PermissionError(f"sandbox: no access to {path}")
    elif event in PATH_EVENTS or event in LISTING_EVENTS:
        roots = READABLE if event in LISTING_EVENTS else [ROOT]
        for arg in args[:2]:
            if isinstance(arg, (str, bytes, os.PathLike)) and not _inside(arg, roots):
                raise PermissionError(f"sandbox: {event} outside the working directory")

sys.addaudithook(_guard)
del _guard
source = open("program.py", encoding="utf-8").read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
'''


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run ``program`` (Python source) in the sandbox; it passes if it exits normally."""
    with tempfile.TemporaryDirectory(prefix="dsv2-sandbox-") as workdir:
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "no_proxy": "*"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", GUARD, str(memory_mb * 2**20), str(int(timeout) + 1)], cwd=workdir,
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            errors="replace", start_new_session=True,  # its own process group, killed as a whole
        )
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout", f"over {timeout:g} s")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode == 0:
            return Outcome(True, "passed")
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {proc.returncode}"
        return Outcome(False, "failed", last[-300:])


def run_programs(programs: list[str], timeout: float = 10.0, memory_mb: int = 1024, workers: int = 2) -> list[Outcome]:
    """Several programs, each in its own sandboxed process, ``workers`` at a time."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_mb), programs))
