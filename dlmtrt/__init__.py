"""dlmtrt: deploy diffusion language models (Dream, LLaDA) from a Hugging Face checkpoint to an engine.

The sub-packages are the pipeline's stages, left to right, and a stage imports only stages to its left
(tests/test_import_boundaries.py): `models` (the step-contract transformer, loading), `plugins` (the
cached-attention kernel's launcher, torch op and TensorRT plugin), `runtime` (the step
contract, the decode loop, policies, rules, backends), `export` (ONNX), `engine` (TensorRT build), `evals`
(tasks, training, evaluation, backend comparison), `cli` (one file per command). docs/ARCHITECTURE.md has
the map.
"""
__version__ = "0.2.0"
