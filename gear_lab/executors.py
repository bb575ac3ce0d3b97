"""Executors: where the tasks of a sweep run. :class:`SerialExecutor` (the default) runs them in
this process, in order; :class:`RayExecutor` sends them to a Ray cluster (local or remote),
writes one Parquet shard per finished task and skips finished shards when rerun.

An executor maps a picklable ``fn(task) -> rows`` over tasks (objects with a readable ``name``
and a file-name-safe ``shard``) and returns each task's rows (a list of dicts), in task order.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from gear_lab.errors import ConfigError, SweepError, first_line
from gear_lab.files import atomic_write, writable_folder

__all__ = ["EXECUTORS", "Executor", "RayExecutor", "SerialExecutor", "Task", "get_executor"]

Rows = list[dict[str, Any]]
EXECUTORS = ("serial", "ray")
RAY_MISSING = "the ray executor needs Ray and pyarrow: pip install 'gear-lab[ray]'"


class Task(Protocol):
    """One unit of work: ``name`` for messages, ``shard`` (file-name safe) for its result file."""

    @property
    def name(self) -> str: ...

    @property
    def shard(self) -> str: ...


class Executor(Protocol):
    """Runs ``fn`` over ``tasks``; ``key`` identifies the work (what ``fn`` computes) beyond the
    tasks themselves, so that results of a different sweep are never reused."""

    def run(
        self, fn: Callable[[Any], Rows], tasks: Sequence[Task], *, key: str, progress: bool
    ) -> list[Rows]: ...


@dataclass(frozen=True)
class SerialExecutor:
    """Every task in this process, in order; nothing is written."""

    def run(
        self, fn: Callable[[Any], Rows], tasks: Sequence[Task], *, key: str, progress: bool
    ) -> list[Rows]:
        """``fn(task)`` for each task, with one progress bar over tasks."""
        del key  # nothing is stored, so nothing can be mixed up
        bar = tqdm(tasks, desc="sweep", unit="task", disable=not progress)
        out: list[Rows] = []
        for task in bar:
            bar.set_postfix_str(task.name, refresh=False)
            out.append(fn(task))
        return out


def _import_ray() -> Any:
    try:
        import pyarrow  # noqa: F401  (the shards are Parquet files)
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


def _call(fn: Callable[[Any], Rows], task: Task) -> Rows:
    """The Ray task body (module level, so workers import it instead of unpickling code)."""
    return fn(task)


@dataclass(frozen=True)
class RayExecutor:
    """One Ray task per sweep task, on the cluster at ``address`` (``None``: the Ray already
    initialized in this process, else a new local one, shut down afterwards).

    Each finished task's rows are written atomically to ``shards/<task>-<digest>.parquet`` (the
    digest covers the task and the sweep settings); a rerun into the same ``shards`` folder skips
    finished shards. ``shards=None``: a temporary folder, removed on success and kept (named in
    the error) on failure. Workers open the dumps themselves: on a cluster the dump paths must
    resolve on every node (shared storage), and gear-lab must be installed there.
    """

    address: str | None = None
    shards: Path | None = None

    def __post_init__(self) -> None:
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ConfigError(f"address must be a non-empty string, got {self.address!r}")
        if self.shards is not None:
            object.__setattr__(self, "shards", Path(self.shards).expanduser())

    def run(
        self, fn: Callable[[Any], Rows], tasks: Sequence[Task], *, key: str, progress: bool
    ) -> list[Rows]:
        """Run the unfinished tasks on Ray, one bar over all tasks; read every shard back."""
        ray = _import_ray()
        import pandas as pd

        folder = self.shards or Path(tempfile.mkdtemp(prefix="gear-lab-shards-"))
        writable_folder(folder, make=True)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / _shard_name(task, key) for task in tasks]
        todo = [i for i, path in enumerate(paths) if not path.is_file()]
        if todo:
            self._run_ray(ray, fn, tasks, paths, todo, folder, progress)
        out = [pd.read_parquet(path).to_dict("records") for path in paths]
        if self.shards is None:
            shutil.rmtree(folder, ignore_errors=True)
        return out

    def _run_ray(
        self,
        ray: Any,
        fn: Callable[[Any], Rows],
        tasks: Sequence[Task],
        paths: Sequence[Path],
        todo: Sequence[int],
        folder: Path,
        progress: bool,
    ) -> None:
        """Submit ``todo``, write each shard as it arrives; raise :class:`SweepError` at the end
        naming the first failed task (every other task still runs and keeps its shard)."""
        import pandas as pd

        started = not ray.is_initialized()
        if started:
            try:
                ray.init(address=self.address, include_dashboard=False, logging_level="WARNING")
            except Exception as err:  # Ray raises ConnectionError, RuntimeError, ValueError...
                what = f"join the Ray cluster at {self.address}" if self.address else "start Ray"
                raise SweepError(f"cannot {what}: {first_line(err)}") from err
        try:
            remote = ray.remote(num_cpus=1, max_retries=0)(_call)
            fn_ref = ray.put(fn)
            pending = {remote.remote(fn_ref, tasks[i]): i for i in todo}
            failures: list[tuple[Task, BaseException]] = []
            done = len(tasks) - len(todo)
            with tqdm(
                total=len(tasks), initial=done, desc="sweep", unit="task", disable=not progress
            ) as bar:
                while pending:
                    (ref,), _ = ray.wait(list(pending), num_returns=1)
                    i = pending.pop(ref)
                    try:
                        rows = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        failures.append((tasks[i], getattr(err, "cause", None) or err))
                        continue
                    with atomic_write(paths[i]) as tmp:
                        pd.DataFrame(rows).to_parquet(tmp, index=False)
                    done += 1
                    bar.update()
        finally:
            if started:
                ray.shutdown()
        if failures:
            task, cause = failures[0]
            raise SweepError(
                f"task {task.name} failed: {first_line(cause)} ({len(failures)} of {len(todo)} "
                f"tasks failed; {done} of {len(tasks)} shards kept in {folder}; rerun with that "
                "shards folder to resume)"
            )


def _shard_name(task: Task, key: str) -> str:
    digest = hashlib.sha256(f"{key}\n{task!r}".encode()).hexdigest()[:16]
    return f"{task.shard}-{digest}.parquet"


def get_executor(executor: str | Executor | None) -> Executor:
    """An executor from its name (``"serial"``, ``"ray"`` with default settings; ``None``:
    serial) or an executor object, returned as is."""
    if executor is None or executor == "serial":
        return SerialExecutor()
    if executor == "ray":
        return RayExecutor()
    if isinstance(executor, str) or not callable(getattr(executor, "run", None)):
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)} or an executor object")
    return executor
