"""A toy world of coloured shapes with captions, and a pixel-analysis scorer for it."""
