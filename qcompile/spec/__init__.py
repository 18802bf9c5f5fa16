"""What a command is about: the model (`model.ModelSpec`, one resolution rule for MODEL / LIBRARY
arguments), the target (`target.ResolvedTarget`), and the typed-record schema both are read with."""
