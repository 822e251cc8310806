"""Local inference engines behind one protocol (``base.Backend``)."""
