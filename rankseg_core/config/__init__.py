"""The configuration dataclasses of every layer and their dotted-key / YAML handling (no defaults that depend on a model family)."""
