"""Skip2-LoRA fine-tuning for LitGPT: adapters from selected blocks straight to the output, with a Skip-Cache."""

from litgpt_skip2lora.api import LLM
from litgpt_skip2lora.model import GPT, Block, Config, Skip2LoRA

__all__ = ["Block", "Config", "GPT", "LLM", "Skip2LoRA"]
