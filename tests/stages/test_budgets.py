import polars as pl


def test_document_budgets_keep_each_documents_best_pairs_within_its_tokens():
    from fineinstructions_dagster.stages.pairs import DocumentBudgets, over_document_budgets

    pairs = pl.DataFrame({"pair_id": ["p1", "p2", "p3", "p4", "p5"], "doc_id": ["a", "a", "a", "b", "b"],
                          "judge_score": [3, 5, 5, 4, 4], "grounding": [0.9, 0.8, 0.9, 0.5, 0.7],
                          "relevance": [0.5, 0.5, 0.5, None, 0.1]})
    tokens = pl.Series([40, 50, 30, 100, 10])
    docs = pl.DataFrame({"doc_id": ["a", "b"], "document_tokens": [100, 200]})

    def reasons(budgets: DocumentBudgets) -> dict[str, str | None]:
        out = over_document_budgets(pairs, tokens, docs, budgets)
        return dict(zip(out["pair_id"], out["reason"], strict=True))

    # a: p3 (5, 0.9) then p2 (5, 0.8) then p1 (3): 30, 80, 120 tokens; b: p5 (0.7) then p4: 10, 110
    assert reasons(DocumentBudgets(max_token_ratio=1.0)) == {"p3": None, "p2": None, "p1": "over_document_tokens",
                                                               "p5": None, "p4": None}
    assert reasons(DocumentBudgets(max_pairs=1)) == {"p3": None, "p2": "over_pairs_per_document",
                                                     "p1": "over_pairs_per_document", "p5": None,
                                                     "p4": "over_pairs_per_document"}
    assert set(reasons(DocumentBudgets()).values()) == {None} and not DocumentBudgets().on
