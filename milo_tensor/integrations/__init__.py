"""Bridges to other libraries (transformers); importing registers them."""
