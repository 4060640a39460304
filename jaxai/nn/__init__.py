"""Shared building blocks (normalisation, attention, transformer blocks) reused by every paper module."""
