"""Evaluation: task generators with exact checkers, training of the tiny task models, the quality harness,
model cards, and backend comparison on real denoising trajectories."""
