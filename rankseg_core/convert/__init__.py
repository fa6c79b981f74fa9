"""Converters from the official dataset releases to rankseg shards (one module per dataset)."""
