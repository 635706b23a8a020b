"""The fork server: worker processes forked from a process that has imported TensorFlow once.

Importing TensorFlow costs seconds of CPU per process (FACTS.md: ~4 s, more on
a busy machine). A worker forked from a process that has already imported it
starts in a fraction of a second, and shares TensorFlow's pages with its
siblings. This module provides that, behind a multiprocessing context that
loky accepts (`get_context()`), so the pool's protocol, crash detection and
cancellation stay loky's:

    parent (mp_executors)                fork server                  workers
    ---------------------                -----------                  -------
    loky executor per slot --Popen-->    TensorFlow imported,   fork  slot 0: pin, env,
      (pickled Process, fds sent         NOT initialised  ----------> threads, Worker()
       over a unix socket)               (no op, no device,    fork   slot 1: ...
    status pipe <-- pid, exit code --    no thread pool)  ---------->

Where the server comes from (`ForkServer.ensure_running`):

- forked from the parent itself, when the parent is *pristine*: TensorFlow
  imported but its eager context not even created (`context._context is None`:
  no op has run, no device was listed, no thread pool exists) and only one
  Python thread runs. `prestart()` (the factory calls it when it is created)
  arranges this: at once if the parent is pristine now, else right after the
  parent's own TensorFlow import (`mp_executors._tf` calls back at its end),
  so the parent's one import serves every worker. This costs one fork (tens
  of ms, pages shared copy-on-write) instead of an import;
- otherwise (the parent has run TensorFlow already, or other threads run),
  spawned as a fresh interpreter that imports TensorFlow and the worker
  modules, then serves (`serve`): the import then overlaps whatever the
  parent does until its first call.

What a forked worker gets, and why it still works (tests/test_worker_pool.py
checks each from outside the worker): nothing has initialised TensorFlow in
the server, so what TensorFlow reads when it initialises is read in the
worker, after `worker.initialize` has pinned it and applied its slot's
environment: the CPU affinity mask (TensorFlow sizes its thread pools from
it), TF_NUM_INTRAOP/INTEROP_THREADS and `tf.config.threading` (read when the
eager context is created), and CUDA_VISIBLE_DEVICES (read by CUDA at its
initialisation, which happens at the first device listing). The last one
cannot be observed on a machine without a GPU; it holds because the server
never lists devices (checked: `tensorflow_is_pristine()` before every fork
from the parent, and the spawned server runs no TensorFlow code).

Lifetime: one server per parent process, shared by its factories, started on
demand and restarted if it died. It exits when every holder of its "alive"
pipe is gone: the parent and the workers (which exit within about a second of
the parent's death, even by SIGKILL: `worker.initialize` watches the parent).
A forked server never returns into the parent's code: it leaves by
`os._exit`, so the parent's atexit handlers and `finally` blocks never run
in it.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing import (
    connection,
    forkserver,
    popen_forkserver,
    process,
    reduction,
    resource_tracker,
    spawn,
    util,
)
from multiprocessing.context import ForkServerContext as _StdlibForkServerContext
from typing import Any, NoReturn

from mp_executors import _tf

logger = logging.getLogger("mp_executors")

#: Modules a worker needs, imported by the server before it forks (TensorFlow first).
_WORKER_MODULES = ("mp_executors.workers.service", "loky.process_executor", "cloudpickle")


def tensorflow_is_pristine() -> bool:
    """TensorFlow is imported in this process and nothing has initialised it yet.

    Its eager context object does not exist: no op has run, no device was
    listed, no thread pool was created, no `tf.config` setting was made.
    """
    if "tensorflow" not in sys.modules:
        return False
    context = sys.modules.get("tensorflow.python.eager.context")
    return context is not None and getattr(context, "_context", True) is None


def _single_threaded() -> bool:
    # Only this thread runs Python: no lock can be held by a thread that the
    # child would not have. (Native threads of numpy's BLAS re-initialise
    # through their own fork handlers; TensorFlow starts none at import.)
    return threading.active_count() == 1


def _preload() -> None:
    """Imports TensorFlow (quietly) and the worker's modules, running no TensorFlow code."""
    _tf.import_tensorflow()
    for name in _WORKER_MODULES:
        __import__(name)


def _forget_partial_modules() -> None:
    """Drops from `sys.modules` the modules whose import was in progress when this process forked.

    The fork happens in the middle of the parent's imports (TensorFlow's
    import is usually triggered by a module's top-level code): such a module
    is frozen half-executed here, and a worker unpickling a function defined
    further down in it (a `ClientData` builder, say) would not find it. Once
    forgotten, a worker imports the module afresh when it needs it.
    """
    for name, module in list(sys.modules.items()):
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            del sys.modules[name]


class ForkServer(forkserver.ForkServer):
    """A fork server of our own (not multiprocessing's process-wide one): see the module docstring.

    `mode` is 'forked' (from the pristine parent) or 'spawned' once running.
    """

    def __init__(self) -> None:
        super().__init__()
        self._preload_modules = []  # the spawned server preloads in `serve`, not via multiprocessing
        self.mode: str | None = None
        self.started_at: float | None = None
        self.wanted = False  # prestart() asked for a fork at the end of the parent's TF import

    @property
    def pid(self) -> int | None:
        return self._forkserver_pid

    def running(self) -> bool:
        with self._lock:
            return self._alive_unlocked()

    def _alive_unlocked(self) -> bool:
        if self._forkserver_pid is None:
            return False
        try:
            pid, _ = os.waitpid(self._forkserver_pid, os.WNOHANG)
        except ChildProcessError:
            pid = self._forkserver_pid  # not our child any more: treat as gone
        if not pid:
            return True
        # It died: forget it (a new one is started on demand).
        os.close(self._forkserver_alive_fd)
        self._forkserver_address = self._forkserver_alive_fd = self._forkserver_pid = None
        self.mode = None
        return False

    def ensure_running(self, *, import_tensorflow: bool = True) -> None:
        """Starts the server unless it runs: by forking this process if pristine, else by spawning.

        `import_tensorflow`: when TensorFlow is not imported here yet, import
        it here first (this process needs it anyway for its own tracing and
        server-placed values), then fork; False spawns instead.
        """
        with self._lock:
            resource_tracker.ensure_running()  # its fd goes to every worker (shared-memory segments)
            if self._alive_unlocked():
                return
            forking = _fork_allowed()
            if forking and import_tensorflow and "tensorflow" not in sys.modules and _single_threaded():
                _tf.import_tensorflow()  # calls back `_after_tensorflow_import`, which takes this lock: see there
            if self._alive_unlocked():
                return
            if forking and tensorflow_is_pristine() and _single_threaded():
                try:
                    self._start_unlocked(fork=True)
                    return
                except OSError as e:  # e.g. no memory for the page tables: a fresh interpreter then
                    logger.warning("mp_executors: could not fork the fork server (%s); spawning one", e)
            self._start_unlocked(fork=False)

    def _start_unlocked(self, fork: bool) -> None:
        started = time.perf_counter()
        with socket.socket(socket.AF_UNIX) as listener:
            address = connection.arbitrary_address("AF_UNIX")
            listener.bind(address)
            if not util.is_abstract_socket_namespace(address):
                os.chmod(address, 0o600)
            listener.listen()
            # Every client (this process, and each worker) holds the write end;
            # when all are gone the server reads EOF and exits.
            alive_r, alive_w = os.pipe()
            try:
                if fork:
                    pid = self._fork(listener.fileno(), alive_r, alive_w)
                else:
                    code = (f"from mp_executors.workers.fork_server import serve; "
                            f"serve({listener.fileno()}, {alive_r})")
                    exe = spawn.get_executable()
                    args = [exe, *util._args_from_interpreter_flags(), "-c", code]
                    pid = util.spawnv_passfds(exe, args, [listener.fileno(), alive_r])
            except BaseException:
                os.close(alive_w)
                raise
            finally:
                os.close(alive_r)
        self._forkserver_address, self._forkserver_alive_fd, self._forkserver_pid = address, alive_w, pid
        self.mode = "forked" if fork else "spawned"
        self.started_at = time.perf_counter()
        logger.info("mp_executors: fork server (pid %d) %s in %.3f s", pid,
                    "forked from this process after its TensorFlow import" if fork
                    else "spawned (it imports TensorFlow itself)", time.perf_counter() - started)

    @staticmethod
    def _fork(listener_fd: int, alive_r: int, alive_w: int) -> int:
        util._flush_std_streams()
        pid = os.fork()
        if pid:
            return pid
        # The server: a copy of this process that must never return into its code.
        code = 0
        try:
            os.close(alive_w)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            # The parent's objects are never collected here or in the workers:
            # collecting would write to their pages and unshare them.
            gc.freeze()
            _forget_partial_modules()
            for name in _WORKER_MODULES:
                __import__(name)
            forkserver.main(listener_fd, alive_r, [])
        except SystemExit:
            pass  # the normal end: every client is gone
        except BaseException:  # noqa: BLE001 - reported, then the process ends
            code = 1
            try:
                sys.excepthook(*sys.exc_info())
                sys.stderr.flush()
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(code)

    def stop(self) -> None:
        """Stops the server (tests; workers it forked keep running until they are shut down)."""
        with self._lock:
            if self._forkserver_pid is not None:
                self._stop_unlocked()
                self.mode = None


#: This process's fork server (the parent of every worker started with start_method='forkserver').
_server = ForkServer()


def server() -> ForkServer:
    return _server


#: Set to 0 / off to never fork this process (a server is then spawned when a pool starts).
ENV_VAR = "MP_EXECUTORS_FORK_SERVER"


def _fork_allowed() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "off", "no", "false")


def fork_at_tensorflow_import() -> None:
    """Forks the server right after this process imports TensorFlow (`import mp_executors` calls this).

    The worker pool is the default runtime, and this is the one moment when
    TensorFlow is surely imported and not initialised: a program that traces
    its computations first and creates (or implicitly uses) the pool later
    would otherwise wait for a spawned server's import. Costs one fork (tens
    of ms) and an idle process that ends with this one; MP_EXECUTORS_FORK_SERVER=0
    turns it off. Nothing happens if TensorFlow is imported already.
    """
    if _fork_allowed() and "tensorflow" not in sys.modules:
        _server.wanted = True
        _tf.after_import(_after_tensorflow_import)


def disable() -> None:
    """This process never forks a server at its TensorFlow import (workers, the spawned server)."""
    _server.wanted = False


def prestart() -> None:
    """Starts the fork server as early as it is cheap; called when an mp factory is created.

    - Already running: nothing.
    - TensorFlow imported and pristine, one thread: fork it now (tens of ms).
    - TensorFlow not imported yet: fork right after this process imports it
      (`mp_executors._tf` calls `_after_tensorflow_import`); if that never
      happens before the first call, the first call imports it and forks.
    - TensorFlow already initialised here: spawn a server now, so that its
      import overlaps what this process does until its first call.
    """
    if _server.running():
        return
    if "tensorflow" not in sys.modules:
        if _fork_allowed():
            _server.wanted = True
            _tf.after_import(_after_tensorflow_import)
        return
    _server.ensure_running(import_tensorflow=False)


def _after_tensorflow_import() -> None:
    """`mp_executors._tf` calls this at the end of this process's TensorFlow import."""
    if not _server.wanted:
        return
    _server.wanted = False
    if not (tensorflow_is_pristine() and _single_threaded()):
        return  # the first call spawns one (or forks, if still pristine then)
    # Called inside `ensure_running` too (when it imports TensorFlow itself):
    # then it holds the lock, and starts the server when this returns.
    if _server._lock.acquire(blocking=False):
        try:
            if not _server._alive_unlocked():
                resource_tracker.ensure_running()
                _server._start_unlocked(fork=True)
        except OSError as e:  # the first pool start spawns one instead
            logger.warning("mp_executors: could not fork the fork server (%s)", e)
        finally:
            _server._lock.release()


def serve(listener_fd: int, alive_r: int) -> NoReturn:
    """The spawned server's main: imports TensorFlow and the worker modules, then forks on request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    disable()
    _preload()
    gc.freeze()
    try:
        forkserver.main(listener_fd, alive_r, [])
    except SystemExit:
        pass
    os._exit(0)


# ---------------------------------------------------------------- the multiprocessing context


class _Popen(popen_forkserver.Popen):
    """multiprocessing's forkserver Popen, talking to our server, without re-importing `__main__`.

    Like loky's default context, a worker does not run the parent's main
    script (loky pickles functions defined there by value).
    """

    def _launch(self, process_obj: Any) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        popen_forkserver.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            popen_forkserver.set_spawning_popen(None)
        self.sentinel, w = _server.connect_to_new_process(self._fds)
        # As multiprocessing does: a duplicate of the data pipe's write end is
        # the child's sentinel of this process.
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class ForkServerProcess(process.BaseProcess):
    """A process forked by our fork server, with the environment a spawned one would have.

    The server's environment is this process's as it was when the server
    started; a worker gets this process's environment as it is when the
    worker is created, plus `env` (as loky's `env=`), applied in the child
    before its target runs.
    """

    _start_method = "forkserver"

    def __init__(self, *args: Any, env: dict[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.env = {**os.environ, **(env or {})}

    @staticmethod
    def _Popen(process_obj: Any) -> _Popen:
        return _Popen(process_obj)

    def run(self) -> None:
        os.environ.clear()
        os.environ.update(self.env)
        super().run()


class ForkServerContext(_StdlibForkServerContext):
    """A multiprocessing context whose processes come from this module's fork server."""

    Process = ForkServerProcess


_context = ForkServerContext()


def get_context() -> ForkServerContext:
    """The context to give loky (`loky.ProcessPoolExecutor(context=...)`)."""
    return _context


__all__ = ["ENV_VAR", "ForkServer", "ForkServerContext", "ForkServerProcess", "disable", "fork_at_tensorflow_import",
           "get_context", "prestart", "serve", "server", "tensorflow_is_pristine"]
