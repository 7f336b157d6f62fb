"""Data layer: synthetic long-range tasks (:mod:`dnc.data.tasks`), the curriculum over them
(:mod:`dnc.data.curriculum`, stages in ``configs/curriculum/``) and real text through fsspec
(:mod:`dnc.data.corpus`). Pure numpy/torch; nothing here imports Ray."""

from dnc.data.corpus import (bits_per_byte, chunk_documents, iter_documents, resolve_paths,
                             stdlib_source_files, write_parquet)
from dnc.data.curriculum import Curriculum, Stage, load_stages
from dnc.data.tasks import TASKS, Sample, collate, generate, predict_answer, score

__all__ = [
    "TASKS", "Sample", "generate", "score", "predict_answer", "collate",
    "Curriculum", "Stage", "load_stages",
    "resolve_paths", "iter_documents", "write_parquet", "chunk_documents", "stdlib_source_files",
    "bits_per_byte",
]
