"""Model definitions, by Hugging Face architecture name."""

from modelfleet.engine.models.llama import LlamaForCausalLM

MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,  # Llama with q/k/v bias (qkv_bias in ModelConfig)
}
