"""The shard format: label codec, writer, reader, checks of untrusted shard directories, verify and class statistics."""
