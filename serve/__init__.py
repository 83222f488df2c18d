"""Serving registry adapters with vLLM: the launcher, the registry resolver and the fleet."""
