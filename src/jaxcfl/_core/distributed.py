"""Multi-process runs on JAX's own runtime, :mod:`jax.distributed`.

A program started as N processes that each called :func:`jax.distributed.initialize`
(or :func:`initialize` here) sees every device of every process in ``jax.devices()``.
jaxcfl's sweeps lay their configuration axis over all of them
(:func:`jaxcfl.config_mesh`), and ``jaxcfl variance`` spreads its seeds over
the processes. This module holds what that needs, on JAX's public API only
(:mod:`jax.experimental.multihost_utils` for the collectives):

* :func:`initialize`: :func:`jax.distributed.initialize`, after choosing the CPU
  collectives (``jax_cpu_collectives_implementation``, gloo unless set otherwise);
  :func:`initialize_from_env` does it from environment variables, as the CLI does. Both
  refuse a malformed coordinator address at once, say on stderr what they wait for, and
  give up after ``JAXCFL_STARTUP_TIMEOUT`` seconds with one line that names what to check.
* :func:`is_multiprocess`, :func:`process_index`, :func:`is_leader`: process 0 is the
  leader, the only process that touches a shared result folder
  (:class:`jaxcfl._core.folder.ResultFolder`).
* :func:`put_global`, :func:`gather`: a host batch, equal on every process, onto a
  global sharding (each process provides its own shards); a global array back to
  host numpy on every process.
* :func:`on_leader`, :func:`share`, :func:`gather_objects`: run on the leader and
  share its result (or its error) with every process; every process's object, on
  every process.
* :func:`local_share`, :func:`process_local`: this process's round-robin share of a
  list, and a scope whose result folders belong to this process alone (the seeds of
  ``jaxcfl variance`` and their training folders).

Single-process programs (``jax.distributed`` not initialized, or one process) go
through none of the collectives: every helper is then the plain local operation.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import pickle
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

__all__ = ["ENV_DISTRIBUTED", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "ENV_COORDINATOR",
    "ENV_LOCAL_DEVICE_IDS", "ENV_STARTUP_TIMEOUT", "STARTUP_TIMEOUT", "STARTUP_TIMEOUT_STATUS", "CPU_COLLECTIVES",
    "initialize", "initialize_from_env", "startup_timeout", "check_coordinator_address", "is_multiprocess",
    "process_index", "is_leader", "collective", "local_share", "shares_folders", "process_local",
    "put_global", "gather", "share", "on_leader", "gather_objects"]

T = TypeVar("T")

ENV_DISTRIBUTED = "JAXCFL_DISTRIBUTED"
"""``1``: the CLI calls :func:`initialize` with JAX's cluster auto-detection (SLURM, Open MPI, TPU pods)."""
ENV_NUM_PROCESSES = "JAXCFL_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXCFL_PROCESS_ID"
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
"""JAX's own variable (read by :func:`jax.distributed.initialize`): ``host:port`` of process 0's coordinator."""
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
"""JAX's own variable: the comma-separated local devices this process uses (e.g. one GPU per process)."""
ENV_STARTUP_TIMEOUT = "JAXCFL_STARTUP_TIMEOUT"
"""Seconds the start-up waits for every process to join (:func:`initialize`); default :data:`STARTUP_TIMEOUT`."""
STARTUP_TIMEOUT = 300.0
"""The default start-up timeout, in seconds: JAX's own, room for a cluster that starts its processes minutes apart."""
STARTUP_TIMEOUT_STATUS = 2
"""The exit status of a process whose start-up timed out (the command line's status for an error it explains)."""
CPU_COLLECTIVES = "gloo"
"""The CPU cross-process collectives jaxcfl asks for (JAX's default since 0.4.3x; ``mpi`` needs an MPI build)."""

_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxcfl_process_local", default=False)
_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxcfl_leader_alone", default=False)


# --- start-up -----------------------------------------------------------------------------------

_ARGUMENT_NAMES = {"address": "coordinator_address", "count": "num_processes", "index": "process_id", "timeout": "timeout"}
"""What :func:`initialize`'s messages call its settings; :func:`initialize_from_env` names the variables instead."""
_ENV_NAMES = {"address": ENV_COORDINATOR, "count": ENV_NUM_PROCESSES, "index": ENV_PROCESS_ID,
              "timeout": ENV_STARTUP_TIMEOUT}


def startup_timeout(value: float | str | None = None, *, name: str = "timeout",
                    environ: Mapping[str, str] | None = None) -> float:
    """The start-up timeout in seconds: ``value``, else ``JAXCFL_STARTUP_TIMEOUT``, else :data:`STARTUP_TIMEOUT`.

    Raises ``ValueError`` naming ``name`` (or the variable) unless it is a finite number > 0.
    """
    env = os.environ if environ is None else environ
    if value is None and env.get(ENV_STARTUP_TIMEOUT, "") != "":
        value, name = env[ENV_STARTUP_TIMEOUT], ENV_STARTUP_TIMEOUT
    if value is None:
        return STARTUP_TIMEOUT
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name}={value!r}: the start-up timeout must be a number of seconds > 0 "
                         f"(default {STARTUP_TIMEOUT:g})")
    return seconds


def check_coordinator_address(address: Any, name: str = ENV_COORDINATOR) -> str:
    """``address`` if it is ``host:port`` with a port in 1-65535 and a host this machine resolves.

    A malformed address is refused at once (``ValueError`` naming ``name``): JAX would raise an
    ``IndexError`` on ``garbage``, and wait until its timeout on an unknown host.
    """
    example = "e.g. 10.0.0.1:1234 or node0:1234, process 0's host and a free port"
    if not isinstance(address, str):
        raise ValueError(f"{name} must be host:port ({example}), got {address!r:.80}")
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{name}={address!r:.80} is not host:port ({example})")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{name}={address!r:.80}: the port {port!r:.20} must be a number in 1-65535 ({example})")
    try:
        socket.getaddrinfo(host[1:-1] if host.startswith("[") and host.endswith("]") else host, int(port))
    except (OSError, UnicodeError) as err:
        raise ValueError(f"{name}={address!r:.80}: the host {host!r:.60} cannot be resolved ({err}); "
                         f"give process 0's host name or IP address") from None
    return address.strip()


def _check_processes(count: Any, index: Any, names: Mapping[str, str]) -> None:
    for key, value in (("count", count), ("index", index)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise ValueError(f"{names[key]} must be an integer, got {value!r:.40}")
    if count is not None and count < 1:
        raise ValueError(f"{names['count']}={count}: the number of processes must be >= 1")
    if count is not None and index is not None and not 0 <= index < count:
        raise ValueError(f"{names['index']}={index} must lie in [0, {count - 1}] ({names['count']}={count})")


def _waiting(address: str | None, count: int | None, index: int | None, timeout: float,
             names: Mapping[str, str]) -> tuple[str, str]:
    """What the start-up says while it waits, and its error when the time is up (one line each)."""
    longer = f"or wait longer with {names['timeout']} (seconds, now {timeout:g})"
    if address is None or count is None or index is None:
        return (f"jaxcfl: joining a multi-process run that JAX detects from the cluster's environment; "
                f"waiting up to {timeout:g} s (set {ENV_STARTUP_TIMEOUT} to change it)",
                f"the multi-process start-up did not complete within {timeout:g} s: check the cluster's "
                f"job (every process started?) or set {names['address']}, {names['count']} and "
                f"{names['index']} explicitly, {longer}")
    wait = (f"jaxcfl: process {index} of {count}: waiting up to {timeout:g} s for all {count} processes to join "
            f"the run at {address} (set {ENV_STARTUP_TIMEOUT} to change it)")
    if index == 0:
        return wait, (f"process 0 of {count}: the other {count - 1} process(es) did not join at {address} within "
                      f"{timeout:g} s; start them with {names['address']}={address} and {names['count']}={count} "
                      f"(the port must be reachable from their hosts), {longer}")
    return wait, (f"process {index} of {count}: the run at {address} did not start within {timeout:g} s (process 0 "
                  f"not reachable there, or not all {count} processes started); check {names['address']} "
                  f"(process 0's host:port) and {names['count']}, {longer}")


def _give_up(message: str) -> None:
    """The start-up's timeout: one line on stderr, then the process ends (JAX's connect cannot be interrupted)."""
    try:
        sys.stderr.write(f"jaxcfl: error: {message}\n")
        sys.stderr.flush()
    finally:
        os._exit(STARTUP_TIMEOUT_STATUS)


def _start(address: str | None, count: int | None, index: int | None, *, timeout: float | None,
           names: Mapping[str, str], local_device_ids: int | Sequence[int] | None, cpu_collectives: str | None,
           **kwargs: Any) -> None:
    """Validate, say what the start-up waits for, and join the run under the watchdog."""
    if "initialization_timeout" in kwargs:  # JAX's name for it
        if timeout is not None:
            raise ValueError("give timeout or initialization_timeout, not both")
        timeout = kwargs.pop("initialization_timeout")
    seconds = startup_timeout(timeout, name=names["timeout"])
    _check_processes(count, index, names)
    if address is None:
        address = os.environ.get(ENV_COORDINATOR) or None
        if address is not None:
            names = {**names, "address": ENV_COORDINATOR}
    if address is not None:
        address = check_coordinator_address(address, names["address"])
    announce, failure = _waiting(address, count, index, seconds, names)
    print(announce, file=sys.stderr, flush=True)
    if cpu_collectives is not None and jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    watchdog = threading.Timer(seconds, _give_up, args=(failure,))
    watchdog.daemon = True
    watchdog.start()
    try:
        # JAX's own deadline comes later than the watchdog's: it aborts the process with a native stack trace.
        jax.distributed.initialize(address, count, index, local_device_ids=local_device_ids,
                                   initialization_timeout=math.ceil(seconds) + _JAX_GRACE, **kwargs)
    except ValueError as err:  # JAX's own checks (no coordinator found, ...): name what to set
        hint = (f"; set {names['address']}=host:port (process 0's), or run on a cluster JAX detects"
                if address is None else "")
        raise ValueError(f"the multi-process start-up failed: {err}{hint}") from None
    finally:
        watchdog.cancel()


_JAX_GRACE = 30
"""Seconds JAX's own start-up deadline is set beyond the watchdog's: JAX aborts the process (SIGABRT,
a native stack trace) a few seconds after its ``initialization_timeout``."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, local_device_ids: int | Sequence[int] | None = None, cpu_collectives: str | None = CPU_COLLECTIVES,
               timeout: float | None = None, **kwargs: Any) -> bool:
    """Join a multi-process run: :func:`jax.distributed.initialize` with the CPU collectives chosen.

    Call it before anything else touches JAX's devices, with the same arguments as
    :func:`jax.distributed.initialize` (all optional on SLURM, Open MPI and TPU pods,
    which JAX detects). ``cpu_collectives`` is the ``jax_cpu_collectives_implementation``
    used when none is chosen (JAX 0.10 chooses gloo itself; ``mpi`` is set with
    ``JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi``): without cross-process collectives a CPU
    backend cannot run one program over several processes' devices.

    Before it waits, it checks what it can at once (``coordinator_address`` must be
    ``host:port`` with a host that resolves, ``0 <= process_id < num_processes``: ``ValueError``
    naming the argument), and says on stderr what it waits for: the address and the number of
    processes. ``timeout`` (seconds; default ``JAXCFL_STARTUP_TIMEOUT``, else
    :data:`STARTUP_TIMEOUT`; JAX's ``initialization_timeout`` is the same) bounds the wait: when
    the processes have not all joined by then, it writes one line on stderr that names what to
    check and ends the process with status :data:`STARTUP_TIMEOUT_STATUS` (JAX's connect cannot
    be interrupted, and JAX itself would abort the process with a native stack trace).
    A second call is a no-op. Returns whether the run has more than one process.
    """
    if not jax.distributed.is_initialized():
        _start(coordinator_address, num_processes, process_id, timeout=timeout, names=_ARGUMENT_NAMES,
               local_device_ids=local_device_ids, cpu_collectives=cpu_collectives, **kwargs)
    return is_multiprocess()


def initialize_from_env(environ: Mapping[str, str] | None = None, *, timeout: float | None = None) -> bool:
    """:func:`initialize` when the environment asks for a multi-process run; nothing otherwise.

    ``JAXCFL_NUM_PROCESSES`` and ``JAXCFL_PROCESS_ID`` (with JAX's own
    ``JAX_COORDINATOR_ADDRESS``, and ``JAX_LOCAL_DEVICE_IDS`` if wanted) start an explicit
    run; ``JAXCFL_DISTRIBUTED=1`` lets JAX detect the cluster (SLURM, Open MPI, TPU).
    ``JAXCFL_STARTUP_TIMEOUT`` (seconds) bounds the wait for every process to join
    (:func:`initialize`; ``timeout`` overrides it). Every setting is checked before anything
    waits, and errors name the variable to fix.
    Made for a command line: before it starts the run, what native libraries print on stdout
    is sent to stderr (:func:`_native_stdout_to_stderr`), so that stdout holds only what Python
    prints. Returns whether the run has more than one process.
    """
    env = os.environ if environ is None else environ
    count, index = env.get(ENV_NUM_PROCESSES), env.get(ENV_PROCESS_ID)
    asked = count is not None or index is not None or env.get(ENV_DISTRIBUTED, "0") not in ("", "0")
    if not asked or jax.distributed.is_initialized():
        return is_multiprocess()
    if (count is None) != (index is None):
        raise ValueError(f"set both {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or neither, with {ENV_DISTRIBUTED}=1 "
                         f"on a cluster JAX detects)")
    try:
        count_i = None if count is None else int(count)
        index_i = None if index is None else int(index)
    except ValueError:
        raise ValueError(f"{ENV_NUM_PROCESSES}={count!r} and {ENV_PROCESS_ID}={index!r} must be integers") from None
    seconds = startup_timeout(timeout, environ=env)
    _check_processes(count_i, index_i, _ENV_NAMES)
    address = env.get(ENV_COORDINATOR) or None
    if address is not None:
        check_coordinator_address(address, ENV_COORDINATOR)
    elif count_i is not None:
        raise ValueError(f"{ENV_NUM_PROCESSES}={count_i} starts an explicit run, which needs {ENV_COORDINATOR}=host:port "
                         f"(process 0's host and a free port; or {ENV_DISTRIBUTED}=1 alone on a cluster JAX detects)")
    _native_stdout_to_stderr()
    _start(address, count_i, index_i, timeout=seconds, names=_ENV_NAMES, local_device_ids=None,
           cpu_collectives=CPU_COLLECTIVES)
    return is_multiprocess()


def _native_stdout_to_stderr() -> None:
    """Keep stdout for Python: native libraries' prints go to stderr from now on.

    Gloo prints "[Gloo] Rank r is connected to n peer ranks" on the C-level stdout when its
    connections open; the CLI's ``--json`` output must stay pure. File descriptor 1 becomes a copy of
    stderr, and ``sys.stdout`` writes to a duplicate of the former stdout.
    """
    sys.stdout.flush()
    encoding, errors = getattr(sys.stdout, "encoding", None), getattr(sys.stdout, "errors", None)
    saved = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(saved, "w", encoding=encoding, errors=errors)


# --- who am I -----------------------------------------------------------------------------------

def is_multiprocess() -> bool:
    """Whether this program runs as several processes (``jax.distributed`` initialized, more than one)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def process_index() -> int:
    """This process's index (0 unless :func:`is_multiprocess`); never starts a backend on its own."""
    return jax.process_index() if jax.distributed.is_initialized() else 0


def is_leader() -> bool:
    """Whether this is process 0, the one that writes shared results."""
    return process_index() == 0


def collective() -> bool:
    """Whether every process takes part in what runs now: a multi-process run, outside the
    leader's solo sections (:func:`on_leader`)."""
    return is_multiprocess() and not _ALONE.get()


def local_share(items: Sequence[T]) -> list[T]:
    """This process's share of ``items``, dealt round-robin: ``items[p::N]`` for process ``p`` of ``N``
    (all of them with one process)."""
    if not is_multiprocess():
        return list(items)
    return list(items)[jax.process_index()::jax.process_count()]


def shares_folders() -> bool:
    """Whether a result folder opened now is shared by every process (written by process 0 only):
    :func:`collective`, outside :func:`process_local`."""
    return collective() and not _LOCAL.get()


@contextlib.contextmanager
def process_local() -> Iterator[None]:
    """Result folders opened inside belong to this process alone: it writes and reads them
    itself, without asking the others (a process's own share of a training grid)."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


# --- arrays -------------------------------------------------------------------------------------

def put_global(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Every leaf of ``tree`` (host values, equal on every process) as a global array with ``sharding``.

    One process: :func:`jax.device_put`. Several: each process builds only its addressable
    shards from its own copy (:func:`jax.make_array_from_callback`); nothing crosses processes.
    """
    if not is_multiprocess():
        return jax.device_put(tree, sharding)

    def put(leaf: Any) -> jax.Array:
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def gather(tree: Any) -> Any:
    """Every leaf of ``tree`` (global arrays) as one host numpy array, on every process.

    One process, or arrays on this process's devices only: :func:`jax.device_get`.
    Several: an all-gather across processes
    (:func:`jax.experimental.multihost_utils.process_allgather`).
    """
    leaves = jax.tree.leaves(tree)
    if not is_multiprocess() or all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.tree.map(np.asarray, jax.device_get(tree))
    _check_collective("gather")
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _check_collective(what: str) -> None:
    if _ALONE.get():
        raise RuntimeError(f"jaxcfl.distributed.{what} is a collective: it cannot run inside on_leader, "
                           f"where process 0 runs alone")


# --- objects ------------------------------------------------------------------------------------

def _bucket(n: int) -> int:
    """A padded length for ``n`` bytes: few distinct shapes, so few compiled collectives."""
    return max(1024, 1 << max(0, n - 1).bit_length())


def _broadcast_bytes(data: bytes | None) -> bytes:
    """The leader's ``data`` on every process (the others pass ``None``)."""
    from jax.experimental import multihost_utils

    size = int(multihost_utils.broadcast_one_to_all(np.array([len(data) if is_leader() else 0], np.int32))[0])
    buffer = np.zeros(_bucket(size), np.uint8)
    if is_leader():
        buffer[:size] = np.frombuffer(data, np.uint8)
    return multihost_utils.broadcast_one_to_all(buffer)[:size].tobytes()


def share(value: Any) -> Any:
    """The leader's ``value`` (any picklable object) on every process; the others' argument is ignored.

    Inside :func:`on_leader` (process 0 alone) it is ``value``."""
    if not collective():
        return value
    return pickle.loads(_broadcast_bytes(pickle.dumps(value) if is_leader() else None))


def on_leader(fn: Callable[[], T]) -> T:
    """``fn()`` run on the leader only; every process returns its result, or raises its error.

    Every process must call it at the same point (it is a collective). Inside ``fn`` the
    leader is alone: shared result folders do their I/O directly, nested ``on_leader``
    calls just run, and the collectives :func:`gather` and :func:`gather_objects` refuse. One process (or already alone): ``fn()``.
    """
    if not collective():
        return fn()
    data = None
    if is_leader():
        token = _ALONE.set(True)
        try:
            outcome: tuple[bool, Any] = (True, fn())
        except Exception as err:  # noqa: BLE001 - shared, then raised everywhere
            outcome = (False, err)
        finally:
            _ALONE.reset(token)
        try:
            data = pickle.dumps(outcome)
        except Exception as err:  # noqa: BLE001 - an unpicklable result or error must not leave the others waiting
            data = pickle.dumps((False, RuntimeError(f"process 0: {outcome[1]!r:.500} (not shareable: {err})")))
        if not outcome[0]:
            _broadcast_bytes(data)
            raise outcome[1]  # the leader raises its own error, with its traceback
    ok, value = pickle.loads(_broadcast_bytes(data))
    if not ok:
        raise value
    return value


def gather_objects(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), in process order, on every process. One process: ``[value]``."""
    if not is_multiprocess():
        return [value]
    _check_collective("gather_objects")
    from jax.experimental import multihost_utils

    data = pickle.dumps(value)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
    buffer = np.zeros(_bucket(int(sizes.max())), np.uint8)
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buffer))
    return [pickle.loads(rows[i, : sizes[i]].tobytes()) for i in range(len(sizes))]

