"""Quality evaluations that run the engine end to end (perplexity.py)."""
