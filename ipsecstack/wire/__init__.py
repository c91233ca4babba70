"""Stateless wire codecs: one module per format. Nothing here keeps state between calls."""
