"""Local inference engines behind one protocol (``base.EmbeddingBackend``)."""
