"""Where a study's units run: in the driver, in local worker processes, or on Ray actors.

Every executor has the same small interface, used by :func:`camanim.study.run_study`: ``submit(unit)``
while fewer than ``capacity`` units are in flight, ``next_done()`` blocking until one finishes and returning
``(unit, outcome)``, and ``close()``. Workers only compute; outcomes flow back to the driver, which alone
writes the store. A worker that dies (killed, out of memory, pre-empted) turns its in-flight units into
failed outcomes, and the executor starts a fresh worker; the driver retries them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing as mp
import os
import sys
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from camanim.errors import MissingExtraError
from camanim.pipelines.study.units import StudyError, StudySettings, Unit, UnitOutcome, UnitRunner

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")


class InlineExecutor:
    """Runs units one at a time in the driver's process (``--backend local --workers 1``)."""

    capacity = 1

    def __init__(
        self, settings: StudySettings, *, device: str | None = None, threads: int | None = None
    ) -> None:
        import torch

        self._threads = torch.get_num_threads()  # restored on close: this is the caller's process
        self.runner = UnitRunner(settings, device=device, threads=threads)
        self._queue: deque[Unit] = deque()

    def submit(self, unit: Unit) -> None:
        self._queue.append(unit)

    def next_done(self) -> tuple[Unit, UnitOutcome]:
        unit = self._queue.popleft()
        return unit, self.runner(unit)

    def close(self) -> None:
        import torch

        self._queue.clear()
        torch.set_num_threads(self._threads)

    describe = "local, 1 process"


# --------------------------------------------------------------------------------------------------------
# Local worker processes.
# --------------------------------------------------------------------------------------------------------

_RUNNER: UnitRunner | None = None


def _init_worker(settings: StudySettings, device: str | None, threads: int | None) -> None:
    global _RUNNER
    _RUNNER = UnitRunner(settings, device=device, threads=threads)


def _run_in_worker(unit: Unit) -> UnitOutcome:
    assert _RUNNER is not None, "worker not initialised"
    return _RUNNER(unit)


class ProcessExecutor:
    """``N`` spawned worker processes (``concurrent.futures.ProcessPoolExecutor``), each caching its models.

    At most ``N`` units are in flight, one per worker, so a worker's death fails at most the ``N`` units
    then running (the pool cannot tell which of them it was); the pool is restarted.
    """

    def __init__(
        self, settings: StudySettings, workers: int, *, device: str | None = None, threads: int | None = None
    ) -> None:
        self.capacity = int(workers)
        self._args = (settings, device, threads)
        self._pool = self._new_pool()
        self._futures: dict[cf.Future, Unit] = {}
        self._lost: deque[tuple[Unit, UnitOutcome]] = deque()
        self.restarts = 0
        self.describe = f"local, {workers} worker processes"

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=self.capacity,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=self._args,
        )

    def submit(self, unit: Unit) -> None:
        try:
            fut = self._pool.submit(_run_in_worker, unit)
        except BrokenProcessPool as exc:  # a worker died since the last call
            self._recover(exc)
            fut = self._pool.submit(_run_in_worker, unit)
        self._futures[fut] = unit

    def next_done(self) -> tuple[Unit, UnitOutcome]:
        if not self._lost:
            done, _ = cf.wait(list(self._futures), return_when=cf.FIRST_COMPLETED)
            fut = next(iter(done))
            try:
                outcome = fut.result()
            except BrokenProcessPool as exc:
                self._recover(exc)
            else:
                return self._futures.pop(fut), outcome
        return self._lost.popleft()

    def _recover(self, exc: BaseException) -> None:
        """A worker died: every unit in flight fails with the pool (except those already finished); restart."""
        lost = 0
        for fut, unit in self._futures.items():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._lost.append((unit, fut.result()))
            else:
                self._lost.append((unit, _died(unit, exc)))
                lost += 1
        self._futures.clear()
        self._restart()
        log.warning("a worker process died; %d unit(s) in flight will be retried", lost)

    def _restart(self) -> None:
        self._terminate()
        self._pool = self._new_pool()
        self.restarts += 1

    def _terminate(self) -> None:
        # ProcessPoolExecutor (before Python 3.14) cannot kill busy workers; on interruption we must.
        procs = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)

    def close(self) -> None:
        self._futures.clear()
        self._lost.clear()
        self._terminate()


def _died(unit: Unit, exc: BaseException) -> UnitOutcome:
    return UnitOutcome(unit.uid, False, error=f"WorkerDied: {type(exc).__name__}: {exc}", worker="?")


# --------------------------------------------------------------------------------------------------------
# Ray.
# --------------------------------------------------------------------------------------------------------


def ray_module() -> Any:
    """The ``ray`` module, or a :class:`~camanim.errors.MissingExtraError` naming the extra."""
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError("--backend ray needs Ray: pip install 'camanim[ray]'") from exc
    return ray


class _RayWorker:
    """A Ray actor: loads each model once and keeps it (its :class:`UnitRunner` cache)."""

    def __init__(
        self, settings: StudySettings, device: str | None, threads: int | None, sys_path: list[str]
    ) -> None:
        # The driver's import path, so a 'module:factory' importable there is importable here (same machine
        # or shared file system; on a remote cluster the module must be installed).
        for p in reversed(sys_path):
            if p not in sys.path and os.path.isdir(p):
                sys.path.insert(0, p)
        self.runner = UnitRunner(settings, device=device, threads=threads)

    def run(self, unit: Unit) -> UnitOutcome:
        return self.runner(unit)


class RayExecutor:
    """Ray actors, one unit in flight per actor; outcomes come back to the driver.

    Without ``address`` a local Ray instance is started with ``workers x threads`` CPUs and stopped on
    :meth:`close`; with ``address`` (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``) the executor joins
    that cluster and leaves it running. When the cluster has GPUs each actor asks for one (``device`` then
    defaults to ``"cuda"``); otherwise each asks for ``threads`` CPUs.

    Args:
        settings: the study's settings.
        workers: number of actors (``None``: one per GPU, else one per CPU of the cluster).
        address: a cluster to join.
        device: where actors run models.
        threads: torch threads (and CPUs requested) per actor (default 1).
    """

    def __init__(
        self,
        settings: StudySettings,
        workers: int | None = None,
        *,
        address: str | None = None,
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        ray = ray_module()
        self.ray = ray
        self.started = False
        threads = max(1, threads or 1)
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                cpus = (workers or os.cpu_count() or 1) * threads
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
                self.started = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        use_gpu = gpus > 0 and (device is None or str(device).startswith("cuda"))
        n = workers or (gpus if use_gpu else max(1, int(resources.get("CPU", 1)) // threads))
        if use_gpu:
            options: dict[str, Any] = {"num_gpus": min(1.0, gpus / n), "num_cpus": threads}
            device = device or "cuda"
        else:
            options = {"num_cpus": threads}
        self._options = options
        self._init_args = (settings, device, threads, list(sys.path))
        self._cls = ray.remote(_RayWorker)
        self.capacity = n
        self._idle = [self._new_actor() for _ in range(n)]
        self._inflight: dict[Any, tuple[Unit, Any]] = {}
        self.restarts = 0
        where = address or "a local instance"
        self.describe = f"ray ({where}), {n} actors" + (
            f" with {options['num_gpus']:g} GPU each" if use_gpu else ""
        )

    def _new_actor(self) -> Any:
        return self._cls.options(**self._options).remote(*self._init_args)

    def submit(self, unit: Unit) -> None:
        actor = self._idle.pop()
        self._inflight[actor.run.remote(unit)] = (unit, actor)

    def next_done(self) -> tuple[Unit, UnitOutcome]:
        ray = self.ray
        ready, _ = ray.wait(list(self._inflight), num_returns=1)
        ref = ready[0]
        unit, actor = self._inflight.pop(ref)
        try:
            outcome = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
            log.warning("a Ray worker died running %s; starting a new one", unit.key)
            with contextlib.suppress(Exception):
                ray.kill(actor)
            actor = self._new_actor()
            self.restarts += 1
            outcome = _died(unit, exc)
        except ray.exceptions.RayError as exc:  # task-level failure outside the runner (e.g. unpickling)
            outcome = UnitOutcome(unit.uid, False, error=f"{type(exc).__name__}: {exc}", worker="ray")
        self._idle.append(actor)
        return unit, outcome

    def close(self) -> None:
        for _, actor in self._inflight.values():
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        for actor in self._idle:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        self._inflight.clear()
        self._idle.clear()
        if self.started:
            self.ray.shutdown()


def make_executor(
    backend: str,
    settings: StudySettings,
    *,
    workers: int | None = None,
    address: str | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> Any:
    """The executor of ``backend`` (``"local"`` or ``"ray"``)."""

    if backend == "local":
        if address:
            raise StudyError("--address joins a Ray cluster: use it with --backend ray")
        n = max(1, workers or 1)
        if n == 1:
            return InlineExecutor(settings, device=device, threads=threads or 1)
        return ProcessExecutor(settings, n, device=device, threads=threads or 1)
    if backend == "ray":
        return RayExecutor(settings, workers, address=address, device=device, threads=threads)
    raise StudyError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
