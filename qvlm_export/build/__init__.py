"""TensorRT stage: static Q/DQ compatibility check, engine build profiles, engines and their runner.

- ``check_trt``: ``check_path(bundle_or_onnx)`` checks every TensorRT Q/DQ rule without TensorRT.
- ``profiles``: ``BuildProfile`` (frozen) and ``load_profile("edge" | "server" | path)``.
- ``shapes``: optimization-profile (min, opt, max) shapes per engine input and phase.
- ``builder``: ``plan_build`` (pure) and ``build_engines(bundle, profile, out)`` (TensorRT).
- ``environment``: TensorRT version / GPU detection and engine compatibility checks.
- ``trt_runner``: ``TrtEngineSet`` runs an engine directory.

Importing this package (or any module above) never imports tensorrt or starts CUDA;
TensorRT is imported inside the functions that build or run engines.
"""
