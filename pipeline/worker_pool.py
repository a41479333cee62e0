"""Worker processes of the download stage that start warm.

img2dataset's own distributor starts a spawn pool whose workers each import
img2dataset afresh (it pulls in webdataset -> torch, albumentations, cv2 and
wandb: about 6 s of CPU per process) and are replaced every 5 shards
(`maxtasksperchild=5`), and it runs its progress logger as one more spawned
process. On a 2-core node with 500-row shards that start-up was about a third
of the stage's CPU (docs/SPEED.md, "Download stage").

Here the workers come from a forkserver that imported those modules once: each
new worker is a fork of it (milliseconds), so replacing workers stays cheap
and the main process starts no thread-unsafe plain fork. The progress logger
runs as a thread of the main process instead of a process of its own. The stage
starts the forkserver before it imports img2dataset itself (`start_early`), so the
two imports run on two cores at once.
"""
from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from multiprocessing import get_context

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

# what a worker needs (pipeline.pack imports img2dataset's downloader, resizer, writer and logger
# under `torch_hidden`); imported once by the forkserver, inherited by every worker
PRELOAD = ("pipeline.pack",)


@contextlib.contextmanager
def torch_hidden():
    """Import img2dataset inside this: it imports webdataset, which imports torch when it can
    (about 2.7 s of CPU per process, half of img2dataset's import) for DataLoader classes the
    download stage never uses. While torch is hidden webdataset takes its torch-free path; an
    `import torch` afterwards works as usual. A process that already has torch changes nothing."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None   # `import torch` raises ImportError meanwhile
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


# img2dataset's value: a worker is replaced after this many shards (bounds leaks)
MAX_TASKS_PER_CHILD = 5


def worker_context():
    """A multiprocessing context whose new processes are forks of a preloaded forkserver."""
    context = get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context


def pool_needed(processes: int, tasks: int) -> bool:
    """Whether work of `tasks` shards on `processes` processes gets a pool (else it runs inline)."""
    return processes > 1 and tasks > 1


def start_early() -> None:
    """Start the forkserver now: its preload (1.5-3 s of CPU, the same import as this process's)
    then runs on another core while this process imports img2dataset for itself, instead of
    after it. Pools made later with `worker_context()` find it running."""
    from multiprocessing import forkserver
    worker_context()   # sets the forkserver's preload list
    forkserver.ensure_running()


def multiprocessing_distributor(processes_count, downloader, reader, _subjob_size, max_shard_retry):
    """img2dataset's `multiprocessing_distributor` with workers from `worker_context()`.

    Same contract: every shard of `reader` through `downloader`, failed shards
    retried `max_shard_retry` times, progress by tqdm.
    """
    from img2dataset.distributor import retrier
    from tqdm import tqdm

    with worker_context().Pool(processes_count, maxtasksperchild=MAX_TASKS_PER_CHILD) as pool:

        def run(shards):
            failed = []
            for ok, row in tqdm(pool.imap_unordered(downloader, shards)):
                if ok is False:
                    failed.append(row)
            return failed

        retrier(run, run(reader), max_shard_retry)
        pool.terminate()
        pool.join()


def thread_logger_class():
    """img2dataset's `LoggerProcess` (progress lines read from the stats files) run as a thread.

    As a process it re-imports img2dataset and wandb to print a few lines.
    """
    from img2dataset.logger import LoggerProcess

    class LoggerThread(LoggerProcess):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.q = queue.Queue()  # the stop signal stays within this process
            self._thread = threading.Thread(target=self.run, daemon=True, name="img2dataset-logger")

        def start(self):
            self._thread.start()

        def join(self, timeout=None):
            self.q.put("stop")
            self._thread.join(timeout)

        def terminate(self):
            pass  # a daemon thread: ends with the process

    return LoggerThread
