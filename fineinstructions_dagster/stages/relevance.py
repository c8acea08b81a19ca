"""Relevance: how well an answer answers its instruction, scored by a sentence-transformers model.

Two kinds of model, both through sentence-transformers' own API:
- a bi-encoder (`SentenceTransformer`): the cosine of the instruction's and the answer's embeddings. The default is
  the packaged all-MiniLM-L6-v2 (trained on question/answer pairs among others), the same model that embeds the
  templates, so it runs offline and costs one extra encode per pair;
- a reranker (`CrossEncoder`, e.g. a ms-marco or bge reranker): the model's score of the (instruction, answer)
  pair, read together; better at telling an answer from a passage on the same topic, and on another scale, so the
  gate's threshold is per model.

A raw score says little on its own: in a corpus about one subject every answer is somewhat similar to every
instruction about it ("How does Python ...?" scores 0.3-0.4 against most answers of a Python corpus). The
`baseline` of an instruction is its mean score against the answers of *other* documents, what an answer that is
not its own scores for it; the gate reads the margin over it (CSLS-style hubness correction, as in matching).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from fineinstructions_dagster.lib.models import model_revision
from fineinstructions_dagster.stages.embedding import Embedder, get_embedder

KINDS = ("auto", "bi-encoder", "cross-encoder")
# An instruction's baseline needs this many answers from other documents (a mean of fewer is mostly noise): below
# it the baseline is unmeasured and the margin gate rejects the pair, saying so.
MIN_BASELINE_ANSWERS = 5
BASELINE_SAMPLE = 32  # a CrossEncoder reads each pair: the other answers it scores per instruction, by content hash


def looks_like_cross_encoder(model: str) -> bool:
    """A local folder whose config names a sequence-classification head (how CrossEncoder checkpoints are saved);
    a Hub id is a bi-encoder unless the kind says otherwise."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


class RelevanceScorer:
    """`score(instructions, answers)` -> one float per pair. `model` empty: the packaged embedder."""

    def __init__(self, model: str = "", kind: str = "auto", batch_size: int = 64, device: str = "cpu"):
        if kind not in KINDS:
            raise ValueError(f"relevance model kind must be one of {KINDS}, got {kind!r}")
        self.embedder: Embedder = get_embedder(model, batch_size, device)
        self.model_name = self.embedder.model_name
        self.kind = kind if kind != "auto" else (
            "cross-encoder" if looks_like_cross_encoder(self.model_name) else "bi-encoder")
        self.batch_size, self.device = batch_size, device

    @functools.cached_property
    def _cross_encoder(self):  # type: ignore[no-untyped-def]
        from sentence_transformers import CrossEncoder

        return CrossEncoder(self.model_name, device=self.device)

    @property
    def name(self) -> str:
        """What lineage records: the model's short name and its kind."""
        return f"{self.embedder.name}:{self.kind}"

    @functools.cached_property
    def revision(self) -> str:
        return model_revision(self.model_name)

    def score(self, instructions: list[str], answers: list[str]) -> np.ndarray:
        if len(instructions) != len(answers):
            raise ValueError(f"{len(instructions)} instructions but {len(answers)} answers")
        if not instructions:
            return np.zeros(0, dtype=np.float32)
        if self.kind == "cross-encoder":
            pairs = list(zip(instructions, answers, strict=True))
            return np.asarray(self._cross_encoder.predict(pairs, batch_size=self.batch_size,
                                                          show_progress_bar=False), dtype=np.float32).reshape(-1)
        # One encode of the distinct texts: a document's k instructions and the controls share many of them.
        texts = list(dict.fromkeys([*instructions, *answers]))
        vecs = self.embedder.encode(texts)
        at = {t: i for i, t in enumerate(texts)}
        a = vecs[[at[t] for t in instructions]]
        b = vecs[[at[t] for t in answers]]
        return np.einsum("ij,ij->i", a, b).astype(np.float32)  # the vectors are L2-normalised: cosine

    def baseline(self, instructions: list[str], instruction_docs: list[str], answers: list[str],
                 answer_docs: list[str]) -> np.ndarray:
        """Per instruction, its mean score against the `answers` from documents other than its own (NaN when
        there are fewer than MIN_BASELINE_ANSWERS of them). A bi-encoder's mean over all of them is one product
        with the mean of their vectors; a CrossEncoder scores up to BASELINE_SAMPLE of them, chosen by hash."""
        out = np.full(len(instructions), np.nan, dtype=np.float32)
        if not instructions or not answers:
            return out
        docs = np.asarray(answer_docs, dtype=object)
        if self.kind == "cross-encoder":
            pairs, owners = [], []
            for row, (text, doc) in enumerate(zip(instructions, instruction_docs, strict=True)):
                others = [a for a, d in zip(answers, answer_docs, strict=True) if d != doc]
                if len(others) < MIN_BASELINE_ANSWERS:
                    continue
                others.sort(key=lambda a, t=text: hashlib.sha256(f"{t}\x00{a}".encode()).digest())
                for a in others[:BASELINE_SAMPLE]:
                    pairs.append((text, a))
                    owners.append(row)
            if pairs:
                scores = np.asarray(self._cross_encoder.predict(pairs, batch_size=self.batch_size,
                                                                show_progress_bar=False), dtype=np.float64).reshape(-1)
                sums = np.bincount(owners, weights=scores, minlength=len(instructions))
                counts = np.bincount(owners, minlength=len(instructions))
                hit = counts > 0
                out[hit] = (sums[hit] / counts[hit]).astype(np.float32)
            return out
        texts = list(dict.fromkeys([*instructions, *answers]))
        vecs = self.embedder.encode(texts).astype(np.float64)
        at = {t: i for i, t in enumerate(texts)}
        a = vecs[[at[t] for t in answers]]
        total, n = a.sum(axis=0), len(answers)
        by_doc = {d: (a[docs == d].sum(axis=0), int((docs == d).sum())) for d in set(instruction_docs)}
        for row, (text, doc) in enumerate(zip(instructions, instruction_docs, strict=True)):
            own, n_own = by_doc[doc]
            if n - n_own >= MIN_BASELINE_ANSWERS:
                out[row] = float(vecs[at[text]] @ ((total - own) / (n - n_own)))
        return out

    def rank(self, query: str, candidates: list[str]) -> list[str]:
        """`candidates` best first as answers to `query` (the same score the gate reads)."""
        if not candidates:
            return []
        scores = self.score([query] * len(candidates), candidates)
        return [candidates[i] for i in np.argsort(-scores, kind="stable")]


@functools.lru_cache(maxsize=4)
def get_relevance_scorer(model: str = "", kind: str = "auto", batch_size: int = 64,
                         device: str = "cpu") -> RelevanceScorer:
    """One scorer per process and config, reused across partitions (it shares the embedder's model)."""
    return RelevanceScorer(model, kind, batch_size, device)
