"""Importing TensorFlow quietly, once, for the whole package.

TensorFlow prints C++ start-up lines (oneDNN, CUDA probing) to file
descriptor 2 before Python logging exists; users asked for a quiet runtime, so
the first import redirects fd 2 to /dev/null for its duration. Set
``MP_EXECUTORS_TF_VERBOSE=1`` to see those lines.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys


@contextlib.contextmanager
def _silenced_fd2():
    if os.environ.get("MP_EXECUTORS_TF_VERBOSE") == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:  # no real fd 2 (some embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow():
    """Returns the `tensorflow` module, importing it without start-up noise."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    uninstall_import_hook()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _silenced_fd2():
        import tensorflow as tf  # noqa: PLC0415 - deliberately lazy and silenced

        tf.get_logger().setLevel("ERROR")
    # Outside the silenced block: a callback may fork (workers.fork_server).
    callbacks, _after_import[:] = list(_after_import), []
    for callback in callbacks:
        callback()
    return tf


#: Called once, right after this process's TensorFlow import (see `after_import`).
_after_import: list = []


def after_import(callback) -> None:
    """Calls `callback()` right after this process imports TensorFlow through `import_tensorflow`.

    `workers.fork_server` forks its server there: TensorFlow is imported and
    nothing has initialised it yet.
    """
    if callback not in _after_import:
        _after_import.append(callback)


def __getattr__(name: str):
    # `from mp_executors._tf import tf` imports TensorFlow on first use.
    if name == "tf":
        return import_tensorflow()
    raise AttributeError(name)


class _QuietTensorFlowImport:
    """A meta-path finder that makes the user's own `import tensorflow` quiet too.

    Installed by `import mp_executors` (which itself imports TensorFlow only
    when first needed): whoever imports tensorflow next gets it through
    `import_tensorflow()`, with the start-up noise silenced.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        uninstall_import_hook()
        import_tensorflow()
        return importlib.util.spec_from_loader(name, _AlreadyImported())


class _AlreadyImported:
    def create_module(self, spec):
        return sys.modules["tensorflow"]

    def exec_module(self, module):
        pass


_hook = _QuietTensorFlowImport()


def install_import_hook() -> None:
    if "tensorflow" not in sys.modules and _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def uninstall_import_hook() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
