"""Hugging Face checkpoint converters that fill `models` parameters."""
