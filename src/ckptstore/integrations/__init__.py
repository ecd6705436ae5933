"""Integrations with training frameworks (OpenCLIP first)."""
