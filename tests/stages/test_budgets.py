import polars as pl


def test_document_budgets_keep_each_documents_best_pairs_within_its_tokens():
    from fineinstructions_dagster.stages.pairs import Budgets, over_document_budgets

    pairs = pl.DataFrame({"pair_id": ["p1", "p2", "p3", "p4", "p5"], "doc_id": ["a", "a", "a", "b", "b"],
                          "judge_score": [3, 5, 5, 4, 4], "grounding": [0.9, 0.8, 0.9, 0.5, 0.7],
                          "relevance": [0.5, 0.5, 0.5, None, 0.1]})
    tokens = pl.Series([40, 50, 30, 100, 10])
    docs = pl.DataFrame({"doc_id": ["a", "b"], "document_tokens": [100, 200]})

    def reasons(budgets: Budgets) -> dict[str, str | None]:
        out = over_document_budgets(pairs, tokens, docs, budgets)
        return dict(zip(out["pair_id"], out["reason"], strict=True))

    # a: p3 (5, 0.9) then p2 (5, 0.8) then p1 (3): 30, 80, 120 tokens; b: p5 (0.7) then p4: 10, 110
    assert reasons(Budgets(max_token_ratio=1.0)) == {"p3": None, "p2": None, "p1": "over_document_tokens",
                                                               "p5": None, "p4": None}
    assert reasons(Budgets(max_pairs=1)) == {"p3": None, "p2": "over_pairs_per_document",
                                                     "p1": "over_pairs_per_document", "p5": None,
                                                     "p4": "over_pairs_per_document"}
    assert set(reasons(Budgets()).values()) == {None} and not Budgets().per_document


def test_template_cap_is_the_largest_count_within_the_share_of_what_the_shard_keeps():
    import numpy as np

    from fineinstructions_dagster.stages.pairs import template_cap

    # 10 + 4 x 1 pairs: a cap of 2 keeps 2 + 4 = 6 (2 <= 0.34 x 6), a cap of 3 keeps 7 (3 > 0.34 x 7)
    assert template_cap(np.array([10, 1, 1, 1, 1]), 0.34) == 2
    assert template_cap(np.array([3, 3, 3]), 0.34) == 3  # already within: nothing capped
    assert template_cap(np.array([5]), 0.2) == 1  # one template: it keeps its best pair
    assert template_cap(np.array([5, 5]), 0.0) == 5  # 0: no cap
    for counts in (np.array([50, 20, 7, 7, 3, 1, 1]), np.arange(1, 40), np.array([1000] + [1] * 300)):
        for share in (0.01, 0.05, 0.1, 0.3):
            c = template_cap(counts, share)
            kept = np.minimum(counts, c).sum()
            assert c == 1 or c <= share * kept  # within the share ...
            assert c >= counts.max() or c + 1 > share * np.minimum(counts, c + 1).sum()  # ... and the largest


def test_template_share_drops_a_hub_templates_worst_pairs_in_a_shard_with_a_reason():
    from fineinstructions_dagster.lib.stats import StageStats
    from fineinstructions_dagster.stages.pairs import cap_template_share

    n = 12
    pairs = pl.DataFrame({"pair_id": [f"p{i:02}" for i in range(n)], "judgement_id": [f"j{i}" for i in range(n)],
                          "instantiation_id": [f"i{i}" for i in range(n)],
                          "template_id": ["hub"] * 8 + ["t1", "t2", "t3", "t4"],
                          "judge_score": [1, 5, 2, 4, 3, 5, 1, 2, 3, 3, 3, 3], "grounding": [0.5] * n,
                          "relevance": [0.1 * i for i in range(n)], "relevance_margin": [0.0] * n,
                          "pair_tokens": [None] * n, "document_tokens": [None] * n},
                         schema_overrides={"pair_tokens": pl.Int64, "document_tokens": pl.Int64})
    stats = StageStats(total=n, kept=n)
    kept, over = cap_template_share(pairs, 0.34, stats)
    # cap 2 keeps 2 + 4 = 6 pairs: the hub's best two (score 5: p05 then p01, by relevance), its other six dropped
    assert kept.filter(pl.col("template_id") == "hub")["pair_id"].to_list() == ["p01", "p05"]
    assert over.height == 6 and set(over["reason"]) == {"over_template_share"}
    assert stats.kept == 6 and stats.dropped["over_template_share"] == 6
    assert kept.group_by("template_id").len()["len"].max() <= 0.34 * kept.height
