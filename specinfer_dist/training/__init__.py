"""Collective boost-tuning of small speculative models (SSMs) by distillation from the LLM."""
