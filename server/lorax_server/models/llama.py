"""Llama layout: RMSNorm, rotary, SwiGLU MLP, GQA. Also CodeLlama, Solar, Mistral/Zephyr (sliding window)."""

from .spec import ArchSpec

LLAMA = ArchSpec(family="llama")

ARCHITECTURES = {
    "LlamaForCausalLM": LLAMA,  # Llama 1-3, CodeLlama, Solar
    "MistralForCausalLM": LLAMA,  # Mistral, Zephyr: same layout, config.sliding_window applies
}
