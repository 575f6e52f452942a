"""Converters between Meta's checkpoint layout and other formats."""
