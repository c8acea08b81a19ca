"""Stage 8, export for pre-training: the final pairs in the chat format trainers load directly
(`messages` = [{role: user, content: instruction}, {role: assistant, content: answer}], as TRL's SFT trainer
and `datasets` expect), and a tokenized variant packed into fixed-length sequences with a loss mask that
covers only answer tokens (the paper trains with the instruction objective: loss on the answer, not the
instruction).

Packing is greedy next-fit in pair_id order (a sequence is closed when the next example does not fit),
whole examples only (an example is never split across two
sequences, so no answer loses its instruction); each example restarts `position_ids` at 0 so varlen
attention kernels can keep examples apart. Examples longer than the sequence length are not packed and are
counted (`dropped_longer_than_sequence`), never cut.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from fineinstructions_dagster.lib.stats import StageStats

CHAT_COLUMNS = ["pair_id", "messages", "doc_id", "template_id", "judge_score", "grounding", "shard"]
PACKED_SCHEMA = {
    "sequence_id": pl.String(), "input_ids": pl.List(pl.Int32), "loss_mask": pl.List(pl.Int8),
    "attention_mask": pl.List(pl.Int8), "position_ids": pl.List(pl.Int32), "pair_ids": pl.List(pl.String),
    "n_examples": pl.Int32(), "answer_tokens": pl.Int32(),
}


def chat_records(pairs: pl.DataFrame) -> pl.DataFrame:
    """One row per pair: `messages` plus the ids a user filters or traces by."""
    msg = pl.struct(pl.lit("user").alias("role"), pl.col("instruction").alias("content"))
    ans = pl.struct(pl.lit("assistant").alias("role"), pl.col("answer").alias("content"))
    return (pairs.sort("pair_id")
            .with_columns(pl.concat_list(msg, ans).alias("messages"))
            .select([c for c in CHAT_COLUMNS if c in pairs.columns or c == "messages"]))


@dataclass(frozen=True)
class PackingConfig:
    tokenizer: str  # a Hugging Face tokenizer name or local path
    seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.seq_len < 16:
            raise ValueError(f"packing seq_len must be >= 16, got {self.seq_len}")


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Any:
    """One tokenizer per process and name, reused across the shards a run exports."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def token_counter(name: str) -> Callable[[list[str]], list[int]]:
    """texts -> their token counts under tokenizer `name` (no special tokens): what the budgets count with."""
    tokenizer = load_tokenizer(name)

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    return count


def _render(tok: Any, instruction: str, answer: str) -> tuple[str, str]:
    """(prompt text, answer text) such that prompt + answer is the whole training text. With a chat template
    the split is where the assistant turn starts; without one a plain layout ending in EOS."""
    if getattr(tok, "chat_template", None):
        user = [{"role": "user", "content": instruction}]
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
    bos = tok.bos_token or ""
    return f"{bos}Instruction:\n{instruction}\n\nAnswer:\n", f"{answer}{tok.eos_token or ''}"


def tokenize_pairs(pairs: pl.DataFrame, tok: Any) -> pl.DataFrame:
    """pair_id, prompt_ids, answer_ids. Prompt and answer are tokenized separately, so the boundary of the
    loss mask is exact (no token straddles it)."""
    rows = pairs.sort("pair_id").select("pair_id", "instruction", "answer").rows()
    rendered = [_render(tok, ins, ans) for _, ins, ans in rows]
    prompts = tok([p for p, _ in rendered], add_special_tokens=False)["input_ids"] if rows else []
    answers = tok([a for _, a in rendered], add_special_tokens=False)["input_ids"] if rows else []
    return pl.DataFrame({"pair_id": [r[0] for r in rows], "prompt_ids": prompts, "answer_ids": answers},
                        schema={"pair_id": pl.String, "prompt_ids": pl.List(pl.Int32),
                                "answer_ids": pl.List(pl.Int32)})


def pack(tokens: pl.DataFrame, seq_len: int, pad_id: int, shard: str = "") -> tuple[pl.DataFrame, StageStats]:
    """Greedy next-fit packing of whole examples, in order, into sequences of exactly `seq_len` tokens."""
    stats = StageStats(total=tokens.height)
    lengths = (tokens["prompt_ids"].list.len() + tokens["answer_ids"].list.len()).to_numpy()
    prompts, answers, pair_ids = tokens["prompt_ids"].to_list(), tokens["answer_ids"].to_list(), tokens["pair_id"]
    seqs: list[dict[str, Any]] = []
    current: list[int] = []  # row indices of the open sequence
    used = 0

    def close() -> None:
        ids, mask, pos, pids = [], [], [], []
        for i in current:
            p, a = prompts[i], answers[i]
            ids += p + a
            mask += [0] * len(p) + [1] * len(a)
            pos += list(range(len(p) + len(a)))
            pids.append(pair_ids[i])
        n = len(ids)
        seqs.append({"sequence_id": f"{shard}:{len(seqs):06d}", "input_ids": ids + [pad_id] * (seq_len - n),
                     "loss_mask": mask + [0] * (seq_len - n), "attention_mask": [1] * n + [0] * (seq_len - n),
                     "position_ids": pos + [0] * (seq_len - n), "pair_ids": pids, "n_examples": len(pids),
                     "answer_tokens": int(sum(mask))})

    # One loop over examples, not tokens: the sequential bin choice is what packing is.
    for i, n in enumerate(lengths):
        if n > seq_len:
            stats.drop("longer_than_sequence")
            continue
        if used + n > seq_len and current:
            close()
            current, used = [], 0
        current.append(i)
        used += int(n)
    if current:
        close()
    stats.kept = stats.total - stats.dropped_total
    stats.extra["sequences"] = len(seqs)
    if seqs:
        stats.extra["fill"] = round(float(np.mean([sum(s["attention_mask"]) / seq_len for s in seqs])), 4)
    stats.check_balanced()
    return (pl.DataFrame(seqs, schema=PACKED_SCHEMA) if seqs else pl.DataFrame(schema=PACKED_SCHEMA)), stats
