import numpy as np
import pytest
import torch

from fineinstructions_dagster.stages.embedding import get_embedder
from fineinstructions_dagster.stages.pooling import CoveragePoolingConfig, coverage_weights, gaussian_coverage_pool


def test_weights_sum_to_one_over_real_tokens_only():
    mask = torch.tensor([[1] * 40, [1] * 7 + [0] * 33, [0] * 30 + [1] * 10])  # right and left padding
    w = coverage_weights(mask, n_chunks=10, sigma=0.05)
    assert w.shape == (3, 10, 40)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 10))
    assert float(w[1, :, 7:].abs().sum()) == 0.0 and float(w[2, :, :30].abs().sum()) == 0.0


def test_chunk_centres_are_evenly_spaced_over_the_document():
    n, length = 10, 1000
    w = coverage_weights(torch.ones(1, length), n_chunks=n, sigma=0.05)[0]
    positions = (torch.arange(length) + 0.5) / length
    centres = (w * positions).sum(-1)  # weighted mean position of each chunk
    expected = (torch.arange(n) + 0.5) / n
    # Interior chunks sit on their centre; the end chunks are pulled inwards slightly by truncation.
    torch.testing.assert_close(centres[2:-2], expected[2:-2], atol=1e-3, rtol=0)
    assert torch.all(centres.diff() > 0)
    peaks = w.argmax(-1)
    assert torch.all((positions[peaks] - expected).abs() <= 0.5 / length + 1e-6)
    # sigma is a share of the length: ~68% of a middle chunk's weight lies within +-sigma of its centre
    near = (positions - expected[5]).abs() <= 0.05
    assert 0.66 < float(w[5][near].sum()) < 0.70


def test_alpha_zero_gives_the_global_mean_and_row_zero_is_the_mean():
    torch.manual_seed(0)
    x = torch.randn(2, 30, 8)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    mean = torch.stack([x[0].mean(0), x[1, :20].mean(0)])
    out = gaussian_coverage_pool(x, mask, CoveragePoolingConfig(alpha=0.0), normalize=False)
    assert out.shape == (2, 11, 8)
    torch.testing.assert_close(out[:, 0], mean)
    torch.testing.assert_close(out[:, 1:], mean[:, None, :].expand(2, 10, 8))
    half = gaussian_coverage_pool(x, mask, CoveragePoolingConfig(alpha=0.5), normalize=False)
    full = gaussian_coverage_pool(x, mask, CoveragePoolingConfig(alpha=1.0), normalize=False)
    torch.testing.assert_close(half[:, 1:], 0.5 * full[:, 1:] + 0.5 * mean[:, None, :])


def test_document_shorter_than_n_tokens():
    x = torch.randn(1, 3, 4)
    out = gaussian_coverage_pool(x, torch.ones(1, 3), CoveragePoolingConfig(n_chunks=10), normalize=False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 1], x[0, 0], atol=1e-4, rtol=0)  # first chunk centre (0.05) -> token 0
    torch.testing.assert_close(out[0, -1], x[0, 2], atol=1e-4, rtol=0)
    empty = gaussian_coverage_pool(x, torch.zeros(1, 3), CoveragePoolingConfig(), normalize=False)
    assert torch.count_nonzero(empty) == 0  # nothing to pool: zeros, not NaN


def test_mean_mode_and_config_validation():
    assert CoveragePoolingConfig(mode="mean").n_vectors == 1
    assert CoveragePoolingConfig().chunk_names()[:3] == ["global", "c0", "c1"]
    for bad in ({"n_chunks": 0}, {"sigma": 0}, {"alpha": 1.5}, {"mode": "max"}):
        with pytest.raises(ValueError):
            CoveragePoolingConfig(**bad)


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


def test_global_vector_equals_sentence_transformers_mean_pooling(embedder):
    texts = ["How do I sort a list in Python?", "A socket is an endpoint of a TCP connection.", "x"]
    pooled = embedder.encode_documents(texts, CoveragePoolingConfig())
    assert pooled.shape == (3, 11, embedder.dim)
    np.testing.assert_allclose(pooled[:, 0], embedder.encode(texts), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, atol=1e-5)


def test_sentence_transformers_module_matches_the_embedder(embedder, tmp_path):
    from sentence_transformers import SentenceTransformer

    from fineinstructions_dagster.stages.pooling_module import GaussianCoveragePooling

    model = SentenceTransformer(modules=[embedder._model[0], GaussianCoveragePooling()], device="cpu")
    texts = ["The list.sort() method sorts a list in place.", "Sockets send and receive data."]
    got = model.encode(texts, output_value="coverage_embeddings", convert_to_numpy=True)
    got = np.stack([np.asarray(g) for g in got]) if isinstance(got, list) else np.asarray(got)
    np.testing.assert_allclose(got, embedder.encode_documents(texts, CoveragePoolingConfig()), atol=1e-5)
    model.save(str(tmp_path / "m"))
    # our own module class, so sentence-transformers asks for trust_remote_code to import it
    reloaded = SentenceTransformer(str(tmp_path / "m"), device="cpu", trust_remote_code=True)
    again = reloaded.encode(texts, output_value="coverage_embeddings", convert_to_numpy=True)
    again = np.stack([np.asarray(g) for g in again]) if isinstance(again, list) else np.asarray(again)
    np.testing.assert_allclose(again, got, atol=1e-5)


def test_long_documents_are_windowed_not_truncated(embedder):
    head = "Sorting lists with sorted() and list.sort() in Python. " * 60  # well past 256 tokens
    tail = "Baking sourdough bread needs flour, water, salt and a starter. " * 60
    pooled = embedder.encode_documents([head + tail], CoveragePoolingConfig())[0]
    bread = embedder.encode(["How do I bake sourdough bread?"])[0]
    truncated = embedder.encode([head + tail])[0]  # sentence-transformers stops at the max length
    assert pooled[-1] @ bread > 0.4 > 0.1 > truncated @ bread  # the last chunk sees the tail
    assert pooled[0] @ bread > truncated @ bread  # and so does the global mean over all windows
