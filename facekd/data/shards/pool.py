"""The process pool that runs one task per shard (forked workers, a shared task counter)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from facekd.errors import DataError

Task = tuple[int, int, int]  # (shard, first sample, end sample)


def _prepare_fork() -> None:
    """Import what the workers would otherwise import lazily on their first shard.

    Forked workers start from the parent's state: importing ``numpy.char`` and
    ``numpy.lib.format`` here once saves each worker doing it on every run.
    """
    import hashlib  # noqa: F401

    import numpy.char
    import numpy.lib.format  # noqa: F401


def run_tasks(tasks: Sequence[Task], fn: Callable[..., dict[str, Any]], source: Any,
              out: Path, workers: int, skip_bad: bool, desc: str
              ) -> Iterator[dict[str, Any]]:
    """Run ``fn(source, out, shard, start, stop, skip_bad)`` over shard tasks, in-process
    or in worker processes, with a progress bar.

    Workers take the next task from a shared counter and send results over a pipe; the
    parent only waits on the pipes (no executor threads or per-task queues), and a worker
    that dies without a word (OOM killer) is a :class:`DataError`, not a hang. On the
    first error no new shard starts, the running ones finish, and the error is raised.
    """
    from tqdm import tqdm

    sizes = {shard: stop - start for shard, start, stop in tasks}
    bar = tqdm(total=sum(sizes.values()), desc=desc, unit="img", mininterval=1.0,
               disable=None)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for shard, start, stop in tasks:
                result = fn(source, str(out), shard, start, stop, skip_bad)
                bar.update(stop - start)
                yield result
            return
        yield from _run_processes(list(tasks), fn, source, str(out), min(workers, len(tasks)),
                                  skip_bad, lambda shard: bar.update(sizes[shard]))
    finally:
        bar.close()


def _run_processes(tasks: list[Task], fn: Callable[..., dict[str, Any]],
                   source: Any, out: str, workers: int, skip_bad: bool,
                   progress: Callable[[int], Any]) -> Iterator[dict[str, Any]]:
    """Results of ``tasks`` run by ``workers`` processes (forked where possible: they
    share the parent's mapped source and imports), in completion order."""
    import multiprocessing as mp
    from multiprocessing.connection import wait as wait_ready

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    if method == "fork":
        _prepare_fork()
    ctx = mp.get_context(method)
    next_task = ctx.Value("q", 0)
    procs: list[Any] = []
    open_pipes: dict[Any, Any] = {}  # receiving end -> its worker, until the worker is done
    try:
        for _ in range(workers):
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_main, daemon=True,
                               args=(sender, next_task, tasks, fn, source, out, skip_bad))
            proc.start()
            sender.close()  # later workers must not inherit it: EOF means this one is done
            procs.append(proc)
            open_pipes[receiver] = proc
        while open_pipes:
            for pipe in wait_ready(list(open_pipes)):
                try:
                    kind, value = pipe.recv()
                except EOFError:
                    proc = open_pipes.pop(pipe)
                    pipe.close()
                    proc.join()
                    if proc.exitcode:
                        raise DataError(f"{out}: a conversion worker died (exit code "
                                        f"{proc.exitcode}); run again to resume") from None
                    continue
                if kind == "error":
                    raise value
                progress(value["shard"])
                yield value
    finally:
        with next_task.get_lock():
            next_task.value = len(tasks)  # no new shard starts; running ones finish
        while open_pipes:  # keep reading, or a worker blocks sending a large result
            for pipe in wait_ready(list(open_pipes)):
                try:
                    pipe.recv()
                except (EOFError, OSError):
                    open_pipes.pop(pipe)
                    pipe.close()
        for proc in procs:
            proc.join()


def _worker_main(pipe: Any, next_task: Any, tasks: list[Task],
                 fn: Callable[..., dict[str, Any]], source: Any, out: str,
                 skip_bad: bool) -> None:
    """A worker process: run tasks until none are left, sending each result (or the error)."""
    try:
        while True:
            with next_task.get_lock():
                index = next_task.value
                next_task.value = index + 1
            if index >= len(tasks):
                return
            shard, start, stop = tasks[index]
            pipe.send(("result", fn(source, out, shard, start, stop, skip_bad)))
    except BaseException as exc:  # reported to the parent, which raises it
        try:
            pipe.send(("error", exc))
        except Exception:  # an exception that does not pickle
            pipe.send(("error", DataError(f"{out}: conversion worker failed: {exc!r}")))
    finally:
        pipe.close()
