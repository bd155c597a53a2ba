"""What comes in: the corpus (files, the hub, the embedded default), chunking, the near-duplicate filter."""
