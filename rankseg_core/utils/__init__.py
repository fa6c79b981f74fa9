"""Plumbing every layer may use: files, JSON, locks, the worker pool, console, progress, integrity, distributed set-up, palette, plotting."""
