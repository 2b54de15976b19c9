"""Offline, deterministic LitGPT data modules (no Hugging Face hub)."""

from litgpt_skip2lora.data.wordnet import WordNetInstruct

__all__ = ["WordNetInstruct"]
