"""Pruning entry points of the seed API (token merging lives here too)."""
