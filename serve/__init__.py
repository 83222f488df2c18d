"""Serving registry adapters with vLLM, the arena, the votes and the feedback loop."""
