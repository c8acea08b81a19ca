import polars as pl
import pytest

from fineinstructions_dagster.config import DocumentFilterConfig
from fineinstructions_dagster.stages.documents import detect_languages, filter_documents

CFG = DocumentFilterConfig(min_words=5, max_words=80, languages=None)
GOOD = ("The quick brown fox jumps over the lazy dog near the quiet river bank, and that is the end of it.\n"
        "Then it went home to rest with the other foxes of the forest.")


def run(texts, cfg=CFG, urls=None):
    raw = pl.DataFrame({"source_file": "s.parquet", "source_row": list(range(len(texts))),
                        "source_id": [str(i) for i in range(len(texts))], "text": texts,
                        "url": urls or [f"http://x/{i}" for i in range(len(texts))], "metadata": "{}"})
    return filter_documents(raw, "shard1", cfg, run_id="r1")


def lines(*parts):
    return "\n".join(parts)


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("only three words", "too_short"),
    ("the word " * 41, "too_long"),
    ("a b c d e f g h i j the of", "short_words"),
    ("extraordinarilylongword and the " + "extraordinarilylongword " * 10, "long_words"),
    ("1234 5678 9012 3456 7890 1122 3344 apple pear the and", "few_alpha_words"),
    ("#heading #more #hash #marks everywhere in the #text and of", "symbol_heavy"),
    (lines(*["- a bullet item of the list and more"] * 5), "bullet_lines"),
    (lines("the story goes on and on and on with the fox", "and then the fox went to the river bank to drink",
           "and so of the fox and the dog we say...", "it never ends for the dog of the farm...", "ok..."),
     "ellipsis_lines"),
    ("quick brown foxes jump over lazy dogs near quiet river banks", "few_stop_words"),
    (lines(GOOD, *["the same line repeated with the dog"] * 4), "repeated_lines"),
    (GOOD + "\n\n" + "\n\n".join(["a repeated paragraph of the text and more"] * 3), "repeated_paragraphs"),
])
def test_each_filter_reason(text, reason):
    kept, rejected, stats = run([text])
    assert kept.height == 0
    assert rejected["reason"].to_list() == [reason]
    assert stats.dropped[reason] == 1


def test_good_document_passes_and_gets_ids():
    kept, rejected, stats = run([GOOD])
    assert rejected.height == 0 and kept.height == 1
    assert kept["doc_id"][0].startswith("d") and kept["text_hash"][0].startswith("h")


def test_boilerplate_lines_are_removed_and_boilerplate_pages_dropped():
    page = lines(GOOD, "We use cookies to improve your experience.", "Copyright 2024. All rights reserved.")
    kept, _, stats = run([page])
    assert kept["text"][0] == GOOD and stats.extra["boilerplate_lines_removed_docs"] == 1
    banner = lines("Accept cookies", "Privacy policy", "Terms of use", GOOD.split("\n")[0])
    _, rejected, _ = run([banner])
    assert rejected["reason"].to_list() == ["boilerplate"]


def test_blocked_domain():
    cfg = DocumentFilterConfig(min_words=5, languages=None, blocked_domains=("spam.example",))
    _, rejected, _ = run([GOOD, GOOD + " more"], cfg, urls=["https://www.spam.example/a", "https://ok.example/b"])
    assert rejected["reason"].to_list() == ["blocked_domain"]


def test_language_id_keeps_english_drops_others():
    german = ("Der schnelle braune Fuchs springt über den faulen Hund, und das ist das Ende der Geschichte. "
              "Dann ging er nach Hause, um sich mit den anderen Füchsen des Waldes auszuruhen.")
    cfg = DocumentFilterConfig(min_words=5, min_stop_words=None)
    kept, rejected, _ = run([GOOD, german], cfg)
    assert kept["language"].to_list() == ["en"] and kept["language_score"][0] >= 0.65
    assert rejected["reason"].to_list() == ["language"]
    assert detect_languages(["\x00\udcff broken"])[0] == ["un"]


def test_empty_shard_gives_empty_output():
    raw = pl.DataFrame(schema={"source_file": pl.String, "source_row": pl.Int64, "source_id": pl.String,
                               "text": pl.String, "url": pl.String, "metadata": pl.String})
    kept, rejected, stats = filter_documents(raw, "empty", CFG)
    assert kept.height == 0 and rejected.height == 0 and stats.total == 0


def test_same_row_twice_gets_two_stable_ids():
    raw = pl.DataFrame({"source_file": "s.jsonl", "source_row": [1, 2, 3], "source_id": ["7", "7", None],
                        "text": [GOOD, GOOD, GOOD], "url": "http://x/1", "metadata": "{}"})
    kept, _, stats = filter_documents(raw, "shard1", CFG)
    again, _, _ = filter_documents(raw, "shard1", CFG)
    assert kept["doc_id"].n_unique() == 3 and kept["doc_id"].to_list() == again["doc_id"].to_list()
    assert kept["text_hash"].n_unique() == 1  # dedup sees them as one text
    assert stats.total == stats.kept == 3
