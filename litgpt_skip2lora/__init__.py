"""Skip2-LoRA fine-tuning for LitGPT: adapters from selected blocks straight to the output, with a Skip-Cache."""

from litgpt_skip2lora.adapters import Adapters
from litgpt_skip2lora.api import LLM
from litgpt_skip2lora.model import GPT, Block, Config

__all__ = ["Adapters", "Block", "Config", "GPT", "LLM"]
