"""A toy world where ELLA can be seen to work on a CPU: scenes of coloured shapes with captions
(`scenes`), a pixel-analysis scorer (`score`), the script that pretrains the frozen toy Stable
Diffusion and T5 (`pretrain`, shipped in models/toy) and the held-out evaluation (`evaluate`)."""
