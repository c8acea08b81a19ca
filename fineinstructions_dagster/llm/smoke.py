"""Smoke models: tiny random-weight Llama checkpoints with a locally trained tokenizer.

No generative model ships in any package and the Hub is unreachable here, so tests and the offline
demo build their own. Their text is noise; structured decoding makes it parse, so every stage runs
through the real engines. Built deterministically (fixed seeds, fixed training text) in seconds.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

SMOKE_MODEL_NAME = "fi-smoke-llama"
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# A deliberately plain chat format; real models bring their own template.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
VOCAB_SIZE = 4096
# head_dim 64: vLLM's CPU attention kernels support it (tiny head sizes are not).
ARCH = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=4096)


def _training_text() -> Iterator[str]:
    """Fixed, offline text to train the tokenizer: Python's documentation sources if installed,
    else the standard library's own source (always present)."""
    docs = [Path("/usr/share/doc/python3.11/html/_sources"), Path("/usr/share/doc/python3-doc/html/_sources")]
    files: list[Path] = []
    for d in docs:
        if d.is_dir():
            files = sorted(d.rglob("*.txt"))
            break
    if not files:
        files = sorted(Path(json.__file__).parent.parent.glob("*.py"))
    for f in files[:400]:
        yield f.read_text(encoding="utf-8", errors="replace")
    # Make sure the JSON punctuation and template tags the stages need are single tokens.
    yield '{"template": "<fi>x</fi>", "answer": "", "score": 5, "feedback": ""}\n' * 200


def _train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        model_max_length=ARCH["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_smoke_model(out_dir: str | Path, seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) the smoke checkpoint at `out_dir`; returns its path."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    marker = out / "smoke_model.json"
    if marker.exists() and not force:
        return out
    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True, torch_dtype="bfloat16", **ARCH,
    )
    torch.manual_seed(seed)
    # bf16 on disk: vLLM's CPU default dtype, so it loads without casting (transformers upcasts to f32).
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    weights = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:12]
    marker.write_text(json.dumps({"name": SMOKE_MODEL_NAME, "revision": f"smoke-{weights}", "seed": seed,
                                  "note": "random weights: output is noise"}, indent=2))
    return out


def smoke_model_revision(path: str | Path) -> str | None:
    marker = Path(path) / "smoke_model.json"
    if marker.exists():
        return str(json.loads(marker.read_text())["revision"])
    return None


if __name__ == "__main__":
    print(build_smoke_model(sys.argv[1] if len(sys.argv) > 1 else "models/smoke", force=True))
