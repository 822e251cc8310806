"""One module per dialect; each only translates between its wire shapes and the core types."""
