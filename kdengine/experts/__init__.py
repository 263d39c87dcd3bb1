"""Prompt experts: K soft prompts (or deep prefixes) sharing one frozen backbone.

* :class:`PromptExperts` — wraps a transformers classification model or causal LM and runs all
  experts as one batched forward (or routes each example to its experts).
"""

from kdengine.experts.prompt_experts import PromptExperts, PromptExpertsOutput

__all__ = ["PromptExperts", "PromptExpertsOutput"]
