"""Gaussian coverage pooling (FineInstructions, stage 4): one forward pass over a document's tokens gives
its global mean plus N Gaussian-weighted means centred at evenly spaced positions, so a template that fits
any one section of a long document can still be retrieved.

For token t of a document of L tokens the relative position is p_t = (t + 0.5) / L; chunk c (of N) is
centred at mu_c = (c + 0.5) / N; its weights are softmax_t(-(p_t - mu_c)^2 / (2 sigma^2)) over the real
(unmasked) tokens, so they sum to one for any L >= 1, including documents shorter than N tokens. Chunk
vector c = alpha * (weighted mean) + (1 - alpha) * (global mean). Output row 0 is the global mean.

`pooling_module.GaussianCoveragePooling` wraps this as a sentence-transformers module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where pooling runs, so that loading the code location stays fast
    from torch import Tensor

GLOBAL_CHUNK = "global"


@dataclass(frozen=True)
class CoveragePoolingConfig:
    """`mode="gaussian"` gives N+1 vectors per document; `mode="mean"` only the global mean (the baseline)."""

    mode: str = "gaussian"
    n_chunks: int = 10  # paper default
    sigma: float = 0.05  # standard deviation as a share of the document's length
    alpha: float = 1.0  # 1: pure chunk mean; 0: every chunk vector equals the global mean

    def __post_init__(self) -> None:
        if self.mode not in ("gaussian", "mean"):
            raise ValueError(f"pooling mode must be 'gaussian' or 'mean', got {self.mode!r}")
        if self.n_chunks < 1:
            raise ValueError(f"pooling n_chunks must be >= 1, got {self.n_chunks}")
        if not self.sigma > 0:
            raise ValueError(f"pooling sigma must be > 0, got {self.sigma}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"pooling alpha must be in [0, 1], got {self.alpha}")

    @property
    def n_vectors(self) -> int:
        return self.n_chunks + 1 if self.mode == "gaussian" else 1

    def chunk_names(self) -> list[str]:
        """Names of the pooled vectors, in output order (recorded on every match)."""
        if self.mode == "mean":
            return [GLOBAL_CHUNK]
        width = len(str(self.n_chunks - 1))
        return [GLOBAL_CHUNK] + [f"c{c:0{width}d}" for c in range(self.n_chunks)]

    def chunk_centres(self) -> list[float | None]:
        """Relative position of each pooled vector's centre in the document (None for the global mean)."""
        if self.mode == "mean":
            return [None]
        return [None] + [(c + 0.5) / self.n_chunks for c in range(self.n_chunks)]

    def describe(self) -> str:
        if self.mode == "mean":
            return "mean"
        return f"gaussian(n={self.n_chunks},sigma={self.sigma:g},alpha={self.alpha:g})"


def coverage_weights(mask: Tensor, n_chunks: int, sigma: float) -> Tensor:
    """[B, T] attention mask -> [B, N, T] weights; each row sums to one over the unmasked tokens."""
    import torch

    mask = mask.to(torch.bool)
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)  # [B, 1]
    # Position by count of real tokens so far: correct for left or right padding alike.
    pos = (torch.cumsum(mask.to(torch.float32), dim=1) - 0.5) / lengths  # [B, T]
    centres = (torch.arange(n_chunks, dtype=torch.float32, device=mask.device) + 0.5) / n_chunks  # [N]
    logits = -((pos[:, None, :] - centres[None, :, None]) ** 2) / (2.0 * sigma * sigma)  # [B, N, T]
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    # Softmax rather than exp/sum: far-away tokens underflow, the normalisation never divides by zero.
    weights = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)  # an all-masked (empty) row gives zeros, not NaN


def gaussian_coverage_pool(token_embeddings: Tensor, mask: Tensor, cfg: CoveragePoolingConfig,
                           normalize: bool = True) -> Tensor:
    """[B, T, D] token embeddings + [B, T] mask -> [B, cfg.n_vectors, D]: global mean first, then chunks."""
    import torch

    m = mask.to(token_embeddings.dtype)
    counts = m.sum(dim=1, keepdim=True).clamp(min=1.0)  # [B, 1]
    global_mean = (token_embeddings * m[:, :, None]).sum(dim=1) / counts  # [B, D]
    if cfg.mode == "mean":
        out = global_mean[:, None, :]
    else:
        w = coverage_weights(mask, cfg.n_chunks, cfg.sigma).to(token_embeddings.dtype)
        chunks = torch.bmm(w, token_embeddings)  # [B, N, D]
        if cfg.alpha < 1.0:
            chunks = cfg.alpha * chunks + (1.0 - cfg.alpha) * global_mean[:, None, :]
        out = torch.cat([global_mean[:, None, :], chunks], dim=1)
    return torch.nn.functional.normalize(out, p=2, dim=-1) if normalize else out
