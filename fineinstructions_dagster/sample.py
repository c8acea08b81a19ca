"""Offline sample inputs from Debian's `python3-doc` (the Python documentation's reStructuredText
sources): FAQ questions become a user-query source, documentation sections become corpus shards.

Real, human-written text that installs without the internet. Nothing is committed: the sample is
built from the installed package at set-up time.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import polars as pl

DOC_ROOTS = (Path("/usr/share/doc/python3-doc/html/_sources"), Path("/usr/share/doc/python3.11/html/_sources"))
DOCS_URL = "https://docs.python.org/3.11/"
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_KEEP_DIRECTIVES = {"note", "warning", "seealso", "tip", "important", "versionadded", "versionchanged",
                    "deprecated", "attention", "caution", "hint"}
_ROLE = re.compile(r":[\w:+-]+:`(?:([^`<]*?)\s*<[^`>]*>|~?!?([^`]*))`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}")
_INLINE = [(re.compile(r"``([^`]+)``"), r"\1"), (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
           (re.compile(r"(?<!\w)\*([^*\s][^*]*)\*"), r"\1"), (re.compile(r"`([^`]+)`_?"), r"\1"),
           (re.compile(r"\|([\w-]+)\|"), r"\1")]


def find_doc_sources() -> Path:
    for root in DOC_ROOTS:
        if root.is_dir():
            return root
    raise FileNotFoundError(
        "python3-doc is not installed (looked in " + ", ".join(map(str, DOC_ROOTS)) + "); "
        "`make setup` installs it with apt-get, or run: apt-get install -y python3-doc"
    )


def clean_inline(line: str) -> str:
    line = _ROLE.sub(lambda m: (m.group(1) or m.group(2) or "").lstrip("~."), line)
    line = _LINK.sub(r"\1", line)
    for pat, rep in _INLINE:
        line = pat.sub(rep, line)
    return line


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def split_sections(rst: str) -> list[tuple[str, str]]:
    """(title, cleaned body) for each section of an RST file; code, doctests and markup dropped."""
    lines = rst.splitlines()
    sections: list[tuple[str, list[str]]] = []
    title, body = "", []
    skip_deeper_than: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if skip_deeper_than is not None:
            if line.strip() and _indent(line) <= skip_deeper_than:
                skip_deeper_than = None
            else:
                i += 1
                continue
        if line.strip() and _UNDERLINE.match(nxt) and len(nxt.strip()) >= len(line.strip()) - 1 \
                and not _UNDERLINE.match(line):
            sections.append((title, body))
            title, body = clean_inline(line.strip()), []
            i += 2
            continue
        if _UNDERLINE.match(line):  # overline of a title, or a transition
            i += 1
            continue
        stripped = line.strip()
        m = re.match(r"\.\.\s+([\w:-]+)::", stripped)
        if m or stripped.startswith(".. "):
            name = m.group(1).split(":")[-1] if m else ""
            if name in _KEEP_DIRECTIVES:
                rest = stripped.split("::", 1)[1].strip()
                if rest:
                    body.append(clean_inline(rest))
            else:
                skip_deeper_than = _indent(line)
            i += 1
            continue
        if stripped.startswith((">>>", "...")) or stripped.startswith(":"):
            i += 1
            continue
        if stripped.endswith("::"):
            text = stripped[:-2].rstrip()
            if text:
                body.append(clean_inline(text + ("" if text.endswith(":") else ":")))
            skip_deeper_than = _indent(line)
            i += 1
            continue
        body.append(clean_inline(stripped) if stripped else "")
        i += 1
    sections.append((title, body))
    out = []
    for t, b in sections:
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(b)).strip()
        paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
        if t or paragraphs:
            out.append((t, "\n\n".join(paragraphs)))
    return out


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _stable_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


def faq_questions(src: Path) -> list[dict[str, str]]:
    rows = []
    for f in sorted((src / "faq").glob("*.rst.txt")):
        rel = f.relative_to(src).as_posix()[: -len(".rst.txt")]
        for title, _ in split_sections(f.read_text(encoding="utf-8")):
            if title.endswith("?"):
                rows.append({"id": _stable_id(rel, title), "text": title, "category": rel.split("/")[-1],
                             "url": f"{DOCS_URL}{rel}.html#{_slug(title)}"})
    return rows


def corpus_sections(src: Path, shard: str) -> list[dict[str, str]]:
    files = sorted((src / shard).rglob("*.rst.txt")) if (src / shard).is_dir() else [src / f"{shard}.rst.txt"]
    rows = []
    for f in files:
        rel = f.relative_to(src).as_posix()[: -len(".rst.txt")]
        for title, text in split_sections(f.read_text(encoding="utf-8")):
            if not text:
                continue
            rows.append({"id": _stable_id(rel, title, text[:200]), "text": f"{title}\n\n{text}" if title else text,
                         "url": f"{DOCS_URL}{rel}.html" + (f"#{_slug(title)}" if title else ""),
                         "title": title, "file_path": rel, "language": "en"})
    return rows


def build_sample(out: str | Path, shards: tuple[str, ...] = ("tutorial", "howto", "faq"),
                 max_docs_per_shard: int | None = None, max_queries: int | None = None) -> dict[str, int]:
    """Write `<out>/queries/python_faq.jsonl` and one corpus shard per docs folder under `<out>/corpus/`
    (Parquet; the `faq` shard as JSON Lines, to exercise both readers). Returns row counts."""
    src = find_doc_sources()
    out = Path(out)
    (out / "queries").mkdir(parents=True, exist_ok=True)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    questions = faq_questions(src)[:max_queries]
    with open(out / "queries" / "python_faq.jsonl", "w", encoding="utf-8") as fh:
        for q in questions:
            fh.write(json.dumps(q, ensure_ascii=False) + "\n")
    counts["queries/python_faq"] = len(questions)
    for shard in shards:
        rows = corpus_sections(src, shard)[:max_docs_per_shard]
        if not rows:
            raise ValueError(f"python3-doc has no section under {shard!r}")
        if shard == "faq":
            with open(out / "corpus" / f"{shard}.jsonl", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            pl.DataFrame(rows).write_parquet(out / "corpus" / f"{shard}.parquet")
        counts[f"corpus/{shard}"] = len(rows)
    return counts
