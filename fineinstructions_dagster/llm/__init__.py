"""LLM engines (vLLM, OpenAI-compatible, transformers) behind one interface, a generation cache, smoke models."""
