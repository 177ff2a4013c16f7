"""rf-client: builds labelled synthetic datasets against Triton servers (light: no torch)."""
