"""Running generated code (HumanEval, MBPP) without trusting it.

Each program runs in its own Python process (``python -I -B``), in a fresh temporary working directory, with:
- resource limits set before the program starts: address space (memory), CPU seconds, file size, core dumps;
- a wall-clock time limit, after which its whole process group is killed;
- an audit hook (PEP 578, which code cannot remove) installed before the program runs, its state out of the
  program's reach, refusing: network access, starting processes (fork, exec, subprocess, os.system — a fork bomb
  stops at its first fork; _posixsubprocess, which could do it without an event of its own, cannot be imported),
  loading native code through ctypes (nor importing it), signalling other processes, changing directory, making
  links, raw ``os.open``, and touching files outside the temporary directory (reading is allowed only there and in
  the Python installation; writing, deleting, renaming only there);
- its output discarded, and its error output written to a file in that directory (so capped at the file-size
  limit);
- a pass only when the program runs to its end: the guard then writes a marker (a nonce from the parent, out of
  the environment before the program starts and held by the audit hook alone, which writes it once, for the guard's
  own call after the program), so exit(), sys.exit(0) or os._exit(0) before the tests run fail, and so does a program
  that walks up the stack (sys._getframe, a traceback's frames) to forge the end.
A program that loops, forks, allocates, floods its output or deletes files fails (or times out) on its own; it
cannot take the evaluation, or the user's files, with it. Audit hooks are a guard, not an operating-system
boundary: to run code from an untrusted source, run the whole evaluation in a container or VM as well.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

GUARD = r'''
import _thread, os, resource, sys

MEMORY, CPU = int(sys.argv[1]), int(sys.argv[2])
for limit, value in ((resource.RLIMIT_AS, MEMORY), (resource.RLIMIT_CPU, CPU), (resource.RLIMIT_FSIZE, 16 << 20),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))


def install(marker):
    # Everything the hook reads is bound here, before the program runs, as immutable values or local names:
    # nothing the program can reach (module globals, builtins, os.path, pathlib) changes what the hook decides.
    # The marker too lives only here: not in any frame or global that the program could walk up to.
    caller, run_code, main_thread = sys._getframe(1), run.__code__, _thread.get_ident()  # caller: main()'s frame
    get_frame, get_ident, write, finished = sys._getframe, _thread.get_ident, os.write, []
    root = os.path.realpath(os.getcwd())
    readable = (root, *sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                               sys.base_exec_prefix)}), "/dev/null", "/dev/urandom")
    denied = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
              "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg", "os.putenv", "os.unsetenv", "os.setuid",
              "os.setgid", "os.chroot", "os.chdir", "os.symlink", "os.link", "resource.setrlimit",
              "signal.pthread_kill", "sys.remote_exec", "os.startfile", "webbrowser.",
              "sqlite3.", "dbm.",  # they open files from C, past the open event
              "gc.get_objects", "gc.get_referrers", "gc.get_referents",  # reaching the guard's state
              "sys._current_frames", "sys.setprofile", "sys.settrace", "sys.addaudithook")
    # native modules that start processes or load native code without an audit event of their own
    denied_imports = frozenset({"_posixsubprocess", "_ctypes", "ctypes", "_testcapi", "_testinternalcapi",
                                "_xxsubinterpreters", "_xxinterpchannels"})
    one_path = frozenset({"os.remove", "os.rmdir", "os.chmod", "os.chown", "os.truncate", "os.mkdir",
                          "shutil.rmtree", "os.utime", "os.listdir", "os.scandir", "glob.glob"})
    two_paths = frozenset({"os.rename", "os.replace", "shutil.move", "shutil.copyfile"})
    listing = frozenset({"os.listdir", "os.scandir", "glob.glob", "glob.glob/2"})
    type_of, decode, error = type, bytes.decode, PermissionError
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def inside(path, roots):
        # Only plain str / bytes paths (a path object's __fspath__ could answer differently the second time), and
        # pure string work: the working directory cannot change (os.chdir is refused) and no link can be made.
        if type_of(path) is bytes:
            path = decode(path, "utf-8", "surrogateescape")
        if type_of(path) is not str or not path or "\0" in path:
            return False
        parts = []
        for part in (path if path[0] == "/" else root + "/" + path).split("/"):
            if part == "..":
                parts = parts[:-1]
            elif part and part != ".":
                parts.append(part)
        real = "/" + "/".join(parts)
        for r in roots:
            if real == r or real.startswith(r.rstrip("/") + "/"):
                return True
        return False

    def guard(event, args):
        if event.startswith(denied) or (event == "import" and args[0] in denied_imports):
            raise error(f"sandbox: {event} {args[0] + ' ' if event == 'import' else ''}is not allowed")
        if event == "dsv2.sandbox.finished":  # run() after the program's end, and only it: then the marker
            frame = get_frame(1)  # whoever called sys.audit
            if finished or get_ident() != main_thread or frame.f_code is not run_code or frame.f_back is not caller:
                raise error("sandbox: only the guard reports the program's end")
            finished.append(True)
            write(2, marker)
            return
        roots = readable if event in listing else (root,)
        if event == "open":  # builtin open (mode: a str) or os.open (mode None)
            path, mode, flags = args
            if type_of(path) is int:  # an already open descriptor
                return
            if mode is None:  # os.open: the one way to a directory's descriptor (dir_fd=), which no task needs
                raise error("sandbox: os.open is not allowed")
            if not inside(path, (root,) if flags & write_flags else readable):
                raise error(f"sandbox: no access to {path}")
        elif event == "glob.glob/2":  # pathname, recursive, root_dir, dir_fd
            if not (args[2] is None or inside(args[2], roots)) or args[3] is not None:
                raise error(f"sandbox: {event} outside the working directory")
        elif event in one_path or event in two_paths:
            for arg in args[:2 if event in two_paths else 1]:
                if not (arg is None and event in listing) and not inside(arg, roots):
                    raise error(f"sandbox: {event} outside the working directory")

    sys.addaudithook(guard)


def run():
    # The program passes only if it runs to its end: then this function asks the hook to write the marker (a nonce
    # the parent made, out of the environment, held by the hook alone) to fd 2; the hook writes it once, for this
    # function called from main() only. exit(), sys.exit() or os._exit() before the end leave it out.
    source = open("program.py", encoding="utf-8").read()
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        raise SystemExit(f"the program exited ({e.code!r}) before it finished") from None
    sys.audit("dsv2.sandbox.finished")


def main():
    install(("\n" + os.environ.pop("DSV2_SANDBOX_MARKER")).encode())  # out of the environment before the program
    run()


main()
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
        marker = f"dsv2-sandbox-finished-{secrets.token_hex(16)}"
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "no_proxy": "*", "DSV2_SANDBOX_MARKER": marker}
        stderr_path = Path(workdir, "stderr.txt")  # a file, not a pipe: capped by the program's file-size limit
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", GUARD, str(memory_mb * 2**20), str(int(timeout) + 1)],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True,  # its own process group, killed as a whole
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return Outcome(False, "timeout", f"over {timeout:g} s")
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        with stderr_path.open("rb") as f:  # its last lines only
            f.seek(max(stderr_path.stat().st_size - 4096, 0))
            tail = f.read().decode("utf-8", "replace").strip()
        if proc.returncode == 0 and tail.endswith(marker):  # it ran to its end
            return Outcome(True, "passed")
        last = tail.splitlines()[-1] if tail else f"exit status {proc.returncode}"
        if proc.returncode == 0:
            last = "the program ended before its tests finished (os._exit or a closed stderr)"
        return Outcome(False, "failed", last[-300:])


def run_programs(programs: list[str], timeout: float = 10.0, memory_mb: int = 1024, workers: int = 2) -> list[Outcome]:
    """Several programs, each in its own sandboxed process, ``workers`` at a time."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_mb), programs))
