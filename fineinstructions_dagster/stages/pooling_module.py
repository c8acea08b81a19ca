"""Gaussian coverage pooling as a sentence-transformers module (kept apart from `pooling` so that importing
the pipeline's config does not import sentence-transformers)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from sentence_transformers.base.modules.module import Module
from torch import Tensor

from fineinstructions_dagster.stages.pooling import CoveragePoolingConfig, gaussian_coverage_pool


class GaussianCoveragePooling(Module):
    """Sentence-transformers pooling module: put it after a `Transformer` module in place of `Pooling`.
    `sentence_embedding` stays the (normalised) global mean, so `model.encode(...)` behaves as with mean
    pooling; `model.encode(..., output_value="coverage_embeddings")` gives the [N+1, D] vectors per text."""

    config_keys = ["mode", "n_chunks", "sigma", "alpha"]
    config_file_name = "gaussian_coverage_pooling.json"

    def __init__(self, mode: str = "gaussian", n_chunks: int = 10, sigma: float = 0.05, alpha: float = 1.0):
        super().__init__()
        self.cfg = CoveragePoolingConfig(mode, n_chunks, sigma, alpha)
        self.mode, self.n_chunks, self.sigma, self.alpha = mode, n_chunks, sigma, alpha

    def forward(self, features: dict[str, Tensor | Any], **kwargs: Any) -> dict[str, Tensor | Any]:
        pooled = gaussian_coverage_pool(features["token_embeddings"], features["attention_mask"], self.cfg)
        features["coverage_embeddings"] = pooled
        features["sentence_embedding"] = pooled[:, 0]
        return features

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        with open(os.path.join(output_path, self.config_file_name), "w") as fh:
            json.dump(asdict(self.cfg), fh, indent=2)
