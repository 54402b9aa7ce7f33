"""Stage 1: synthesis. Generators turn prompts into candidate completions."""
