"""Saguaro (speculative speculative decoding): outcome prediction, pre-speculation, the worker."""
