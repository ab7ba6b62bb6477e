"""Ready-made pipeline stages for well-known model libraries (HuggingFace: :mod:`.hf`)."""
