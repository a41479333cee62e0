"""The download stage's process set-up: img2dataset imported without torch, workers from a forkserver."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, script: Path | None = None) -> str:
    if script is not None:   # a file: forkserver workers import the main module to find its functions
        script.write_text(code)
    argv = [sys.executable, str(script)] if script is not None else [sys.executable, "-c", code]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_img2dataset_is_imported_without_torch_and_torch_still_imports_afterwards():
    out = _run("import sys, pipeline.pack, pipeline.worker_pool as wp\n"
               "print('torch' in sys.modules)\n"
               "with wp.torch_hidden():\n"
               "    import img2dataset.main\n"
               "print('torch' in sys.modules)\n"
               "import torch\n"
               "print(torch.tensor([2]).item())\n")
    assert out.splitlines() == ["False", "False", "2"]


def test_a_process_that_has_torch_keeps_it():
    out = _run("import sys, torch, pipeline.worker_pool as wp\n"
               "with wp.torch_hidden():\n"
               "    import torch as again\n"
               "print(again is torch, sys.modules['torch'] is torch)\n")
    assert out == "True True"


def test_forkserver_workers_start_without_torch(tmp_path):
    out = _run("import sys\n"
               "from pipeline.worker_pool import worker_context\n"
               "def probe(_):\n"
               "    import sys\n"
               "    return ('img2dataset.resizer' in sys.modules, 'torch' in sys.modules)\n"
               "if __name__ == '__main__':\n"
               "    with worker_context().Pool(1) as pool:\n"
               "        print(pool.map(probe, [0]))\n", tmp_path / "probe.py")
    assert out == "[(True, False)]"


def test_start_early_starts_the_forkserver_that_later_pools_fork_from(tmp_path):
    """`start_early` runs the workers' imports while the main process does its own; the pool made
    afterwards must use that forkserver (its workers are its children), not start a second one."""
    out = _run("import os\n"
               "from multiprocessing import forkserver\n"
               "from pipeline import worker_pool\n"
               "def probe(_):\n"
               "    import sys\n"
               "    return os.getppid(), 'img2dataset.resizer' in sys.modules\n"
               "if __name__ == '__main__':\n"
               "    worker_pool.start_early()\n"
               "    server = forkserver._forkserver._forkserver_pid\n"
               "    with worker_pool.worker_context().Pool(2) as pool:\n"
               "        parents = set(pool.map(probe, range(4)))\n"
               "    print(server is not None and parents == {(server, True)})\n", tmp_path / "early.py")
    assert out == "True"
