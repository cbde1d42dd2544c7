"""The sandbox against programs that try to pass without running to their end, or to start processes through
modules that raise no audit event of their own."""

from dsv2.eval.sandbox import run_program

FORK_EXEC = """import _posixsubprocess, os
r, w = os.pipe()
_posixsubprocess.fork_exec([b'/usr/bin/touch', b'{target}'], [b'/usr/bin/touch'], True, (), None, None,
                           -1, -1, -1, -1, -1, -1, r, w, True, False, None, None, None, -1, None, False)
import time; time.sleep(0.5)
"""


def test_a_program_cannot_forge_its_end_from_the_guards_frames():
    programs = [
        "import sys, os\nfor name, value in sys._getframe(1).f_locals.items():\n"
        "    if isinstance(value, bytes): os.write(2, value)\nos._exit(0)\nassert False",
        "import sys, os\ntry:\n    raise ValueError\nexcept ValueError as e:\n    f = e.__traceback__.tb_frame\n"
        "while f is not None:\n    for v in f.f_locals.values():\n        if isinstance(v, bytes): os.write(2, v)\n"
        "    f = f.f_back\nos._exit(0)\nassert False",
        "import sys\nsys.audit('dsv2.sandbox.finished')\nimport os\nos._exit(0)",  # asking the hook itself
        "import sys, types, os\nrun = sys._getframe(1).f_globals['run']\n"
        "types.FunctionType(run.__code__, {**run.__globals__, 'exec': lambda *a: None})()\nos._exit(0)",
    ]
    for program in programs:
        outcome = run_program(program)
        assert not outcome.passed, program
    assert run_program("x = 1\nassert x == 1").passed  # a program that runs to its end still passes


def test_native_modules_that_start_processes_unaudited_cannot_be_imported(tmp_path):
    target = tmp_path / "escaped"
    outcome = run_program(FORK_EXEC.format(target=target))
    assert not outcome.passed and "import _posixsubprocess is not allowed" in outcome.detail
    assert not target.exists()
    assert not run_program("import ctypes").passed
