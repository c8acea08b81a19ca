"""The lineage chain as markdown for the web UI (the tracing itself is tested end to end)."""


def test_model_text_in_the_lineage_markdown_is_shown_as_text():
    from fineinstructions_dagster.stages.lineage import _md_cell

    cell = _md_cell("What is `<fi>a | b</fi>` *really* [x]?")
    assert cell == "What is \\`&lt;fi&gt;a \\| b&lt;/fi&gt;\\` \\*really\\* \\[x\\]?"
