import os
import sys

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: kernels run on CPU
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # a worker of `pytest -n N`, before torch is imported:
    # the cores shared out among the workers, not all of them each (2 workers of 2 threads on 2
    # cores spent 6% more CPU time: `make test` 7 min 37 s, with 1 thread each 7 min 10 s)
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def _patch_the_language_once_a_launch() -> None:
    """The Triton interpreter patches triton.language for a kernel launch, and again, in full,
    at every call of a @triton.jit function inside it (inspect.getmembers over the language's
    modules: about 1 ms a call, 30% of a launch of kernels A to D). A call inside a launch
    whose modules are patched already (by the launch, or by an earlier call in it: those
    patches stand until the launch ends) skips the repeat; the kernels run as before.
    Where this Triton's interpreter is laid out otherwise, nothing is changed."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    launch_type = getattr(interpreter, "GridExecutor", None)
    if patch is None or scope_type is None or launch_type is None or not hasattr(scope_type, "restore"):
        return
    launches = []  # for each launch under way, the language modules patched since it began

    def languages(fn):
        return {id(value) for value in fn.__globals__.values()
                if value is interpreter.tl or value is interpreter.tl.core}

    def patch_once(fn):
        wanted = languages(fn)
        if isinstance(sys._getframe(1).f_locals.get("self"), launch_type):  # a launch: restored at its end
            scope = patch(fn)
            launches.append(set(wanted))
            restore = scope.restore

            def restore_and_end():
                restore()
                launches.pop()

            scope.restore = restore_and_end
            return scope
        if launches and wanted <= launches[-1]:
            return scope_type()  # a call inside the launch: its modules stand patched
        scope = patch(fn)  # (never restored, as the interpreter leaves it)
        if launches:
            launches[-1] |= wanted
        return scope

    interpreter._patch_lang = patch_once


if os.environ["TRITON_INTERPRET"] == "1":
    _patch_the_language_once_a_launch()

# Files with module-wide fixtures (a compilation, exported networks, tiny training runs, data
# trees), the longest first: under pytest-xdist each runs whole in one worker, so that its
# fixtures run once, and the rest go out test by test. The seconds are those of one `make test`
# (2 workers, 2e1ec78): export 163, train 90, AOT compilation 40; checkpoint, data and gpu_check a few.
WHOLE_FILES = ("test_export.py", "test_train.py", "test_triton_aot.py", "test_checkpoint.py", "test_data.py",
               "test_gpu_check.py")


def _file_of(nodeid: str) -> str:
    return os.path.basename(nodeid.split("::", 1)[0])


def pytest_collection_modifyitems(items):
    """The whole files first, the longest first: the scheduler below hands work out in
    collection order, and a long file taken up last by one worker kept the other idle at the end."""
    def rank(item):
        name = _file_of(item.nodeid)
        return WHOLE_FILES.index(name) if name in WHOLE_FILES else len(WHOLE_FILES)

    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n N` (--dist load, or loadgroup): each of WHOLE_FILES is one unit of work, every other
    test its own. (xdist's own `xdist_group` marks group nothing under pytest 9.2, which builds
    node ids in a way xdist 3.8's renaming no longer reaches: every module fixture ran once in
    each worker, the AOT compilation twice.)"""
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None  # --dist each, loadscope, loadfile, worksteal: as asked
    from xdist.scheduler import LoadScopeScheduling

    class WholeFiles(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if _file_of(nodeid) in WHOLE_FILES else nodeid

    config.option.loadscopereorder = False  # collection order (above), not the units' test counts
    return WholeFiles(config, log)
