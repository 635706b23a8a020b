"""The exceptions mp_executors raises on purpose, and how client errors travel.

- `WorkerCrashedError`: a worker process died (killed, out of memory, a
  segfault) and retries ran out. It says which slot, which clients, how the
  process ended, its last memory reading, and what to try.
- An exception raised by client work (a failing `tf.debugging` assertion,
  say) reaches the caller as the same exception type where possible, its
  message prefixed with the client index and the worker slot and followed by
  the worker-side traceback (`with_client_context`). It is not retried:
  computations are deterministic, so it would fail again.
"""

from __future__ import annotations

import pickle
import signal
import traceback


class WorkerCrashedError(RuntimeError):
    """A worker process died while it held clients' values or work."""

    def __init__(self, slot: int, clients: tuple[int, int] | None, exitcode: int | None,
                 last_rss: int | None, phase: str, attempts: int = 1):
        self.slot, self.clients, self.exitcode, self.last_rss = slot, clients, exitcode, last_rss
        self.phase, self.attempts = phase, attempts
        super().__init__(slot, clients, exitcode, last_rss, phase, attempts)

    def __str__(self) -> str:
        # Derived from the fields, so that updating `attempts` updates the message.
        return self._message()

    def describe(self) -> str:
        """What happened, without the advice (for log lines before a retry)."""
        how = describe_exit(self.exitcode)
        held = f"clients {self.clients[0]}..{self.clients[1] - 1}" if self.clients else "no clients yet"
        memory = f"{self.last_rss / 2**20:.0f} MiB" if self.last_rss else "unknown"
        return (
            f"worker slot {self.slot} died during {self.phase} ({how}) while holding {held}; "
            f"its last memory reading was {memory}"
        )

    def _message(self) -> str:
        hint = (
            "a SIGKILL is most often the kernel's out-of-memory killer: give each worker fewer clients "
            "(more workers, or mpx.ClientData so data is built in the workers), or set "
            "memory_per_worker / num_workers so fewer workers share the memory"
            if self.exitcode in (-signal.SIGKILL, 137)
            else "check the worker's stderr above; run with mpx.local_executor_factory() to debug in-process"
        )
        return f"{self.describe()}. Gave up after {self.attempts} attempt(s). Hint: {hint}."

    def __reduce__(self):
        return (WorkerCrashedError, (self.slot, self.clients, self.exitcode, self.last_rss, self.phase, self.attempts))


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class ClientWorkError(RuntimeError):
    """Client work failed with an exception that could not be re-raised as its own type."""


def with_client_context(error: BaseException, where: str) -> BaseException:
    """The same kind of exception, its message prefixed by `where`, plus the traceback.

    Falls back to ClientWorkError when the original type cannot be rebuilt
    with a new message or cannot be pickled back to the parent.
    """
    tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    original = getattr(error, "message", None) or str(error)
    message = f"{where}: {original}\n\n--- worker-side traceback ---\n{tb}"
    candidates = []
    if hasattr(error, "node_def") and hasattr(error, "op"):  # tf.errors.OpError and subclasses
        candidates.append(lambda: type(error)(error.node_def, error.op, message))
    candidates.append(lambda: type(error)(message))
    for build in candidates:
        try:
            rebuilt = build()
            pickle.loads(pickle.dumps(rebuilt))
            return rebuilt
        except Exception:  # noqa: BLE001 - try the next way, then fall back
            continue
    return ClientWorkError(f"{type(error).__name__}: {message}")
