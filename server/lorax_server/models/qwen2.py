"""Qwen2: the Llama layout with biases on q/k/v (not on o); sliding window only where configured."""

from .spec import ArchSpec

QWEN2 = ArchSpec(family="qwen2", qkv_bias=True)

ARCHITECTURES = {"Qwen2ForCausalLM": QWEN2}
