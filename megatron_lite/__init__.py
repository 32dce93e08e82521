"""megatron_lite: a compact Megatron-style model-parallel GPT codebase."""
__version__ = "0.1.0"
