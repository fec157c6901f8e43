"""Fused CUDA kernels for OSNet: the depthwise LiteConv (3x3 depthwise + folded BN + ReLU, optionally
writing per-channel sums) and the 4-stream aggregation gate.

One CUDA C++ source per op (`depthwise_liteconv.cu`, `aggregation_gate.cu`), header-free so NVRTC
(CuPy, TensorRT AOT plugins) compiles it as is. `reference` holds the NumPy semantics of each op,
`launch` the launch arithmetic and the CuPy launchers (`engine_builder.fused_osnet` puts them into OSNet),
`compile_check` the nvcc build check CI runs. Nothing heavy is imported here: CuPy and torch load
only in the modules that need them.
"""
