"""The cached-attention kernel and its users: the C-ABI launcher (`launcher`), a torch custom op around it
(`torch_op`) and the TensorRT plugin (`trt_plugin`). The CUDA source lives in plugins/cached_attention/ at the
repository root; `make plugin` builds it into dlmtrt/plugins/lib/."""
