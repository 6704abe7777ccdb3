"""Runtime denoisers behind the one `Denoiser` protocol (tfsdeploy.diffusion.Denoiser): torch (CPU or
CUDA), ONNX Runtime (CPU or CUDA provider) and TensorRT. Each declares its `device`, `dtype` and
`describe()`; the samplers never ask which engine they are running. The engine names and the
files each one runs are tabled once, in tfsdeploy.config (ENGINES, ARTIFACT_FILES).
"""
