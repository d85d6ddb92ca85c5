"""Backend-independent decoding: the denoising loop, unmasking rules, statistics, backends."""
