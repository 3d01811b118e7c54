"""Stage ``init_embeddings``: the generator's initial class-embedding table.

``teacher_fc``: the rows of the teacher's classifier weight (C × D), Qimera's extracted
initialisation; ``random``: N(0, 1) drawn from ``train.seed``
(:func:`qimera.generators.initial_embeddings`, as ``qimera run`` draws it). Writes
``outputs/embeddings.pt`` = ``{"embeddings": tensor, "init": str, "seed": int}``; ``train``
passes the tensor to the trainer (``Trainer(..., initial_embeddings=...)``).
"""

from __future__ import annotations

from .common import (EMBEDDINGS, EMBEDDINGS_CONFIG, TEACHER_RECORD, read_json, read_yaml, run_stage, torch_save,
                     workspace_teacher)


def main() -> None:
    from qimera.generators import initial_embeddings
    from qimera.teachers import load_teacher

    spec = read_yaml(EMBEDDINGS_CONFIG)
    teacher = load_teacher(workspace_teacher(read_json(TEACHER_RECORD)))
    table = initial_embeddings(spec["embedding_init"], teacher, int(spec["seed"]))
    torch_save(EMBEDDINGS, {"embeddings": table, "init": spec["embedding_init"], "seed": int(spec["seed"])})
    print(f"init_embeddings: {spec['embedding_init']} table {list(table.shape)}")


if __name__ == "__main__":
    run_stage("init_embeddings", main)
