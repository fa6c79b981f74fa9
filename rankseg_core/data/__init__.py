"""Training and test data from shards: augmentation (mmseg semantics) and the training loader."""
