"""realfake.core: the shared vocabulary every other package stands on (numpy and Pillow only, never torch)."""
