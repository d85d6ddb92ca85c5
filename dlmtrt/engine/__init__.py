"""TensorRT engine builds from the exported step graph (`tensorrt` where importable, else `tensorrt_rtx`,
which share one Python API)."""
