"""Server-side code: the sampler the Triton `pipeline` model runs, its components on each runtime, and what a
server reads from an export."""
