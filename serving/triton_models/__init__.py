"""Sources of the Triton Python-backend models; `rf-export repo` copies them into a repository."""
