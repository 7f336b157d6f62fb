"""The corpus reader must start when the training workers and Serve hold most of the CPUs.

Ray Data tasks ask for one whole CPU by default. In ``make run`` on a 2-core machine the two
training workers (0.5 CPU each) and the served model (0.5) left half a CPU free, so the read task
was never scheduled and training waited forever for its first corpus batch (session 8)."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.ray


def test_corpus_reads_with_half_a_cpu_free(ray_cluster, tmp_path):
    import ray

    from ray_jobs.data import build_dataset

    text = tmp_path / "corpus.txt"
    text.write_bytes(b"def f(x):\n    return x + 1\n" * 400)

    @ray.remote(num_cpus=1.5)
    class Holder:  # stands in for the training workers and the Generator of the demo
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    try:
        assert ray.get(holder.ready.remote(), timeout=60)
        ds = build_dataset([str(text)], max_len=63)
        rows: list = []
        # a daemon thread: when the read hangs, the test fails instead of waiting with it
        reader = threading.Thread(target=lambda: rows.extend(ds.take(4)), daemon=True)
        reader.start()
        reader.join(timeout=90)
        if reader.is_alive():
            pytest.fail("the corpus read never started with 0.5 CPU free: Ray Data tasks must ask for "
                        "less than one CPU (ray_jobs/data.py DATA_TASK_CPUS)")
        assert len(rows) == 4 and all(len(r["tokens"]) == 64 for r in rows)
    finally:
        ray.kill(holder)
