"""TensorRT stage: static Q/DQ compatibility check, engine build profiles, engines and their runner.

- ``check_trt``: ``check_path(bundle_or_onnx)`` checks every TensorRT Q/DQ rule without TensorRT.
- ``profiles``: ``BuildProfile`` (frozen) and ``load_profile("edge" | "server" | "auto[:base]" | path)``.
- ``shapes``: optimization-profile (min, opt, max) shapes per engine input and phase.
- ``fit``: plans that fit the model: image-token bound, ``--profile auto`` sizing, the 2^31-1 element check.
- ``builder``: ``plan_build`` (pure) and ``build_engines(bundle, profile, out)`` (TensorRT).
- ``last_token``: the decoder copy whose logits hold the last position (``decoder_logits: last``).
- ``environment``: TensorRT version / GPU detection and engine compatibility checks.
- ``trt_runner``: ``TrtEngineSet`` runs an engine directory.

Importing this package (or any module above) never imports tensorrt or starts CUDA;
TensorRT is imported inside the functions that build or run engines.
"""
