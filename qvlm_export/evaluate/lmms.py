"""lmms-eval adapter: a bundle (ONNX Runtime) or engine directory (TensorRT) as an lmms-eval model.

lmms-eval is the harness VLM quantization papers report with. ``pip install -e ".[lmms]"``
registers ``qvlm_export`` through its ``lmms_eval.models`` entry point (:func:`manifest`)::

    lmms-eval --model qvlm_export --model_args bundle=runs/default/bundles/w8a8 --tasks scienceqa_img

This module holds the work and imports no lmms-eval: :class:`BundleLMM` answers
``generate_until`` (greedy, the bundle's own chat template, cut at the task's stop strings)
and ``loglikelihood`` (sum of the continuation tokens' log-probabilities after one prefill of
prompt + continuation, and whether greedy decoding would have produced them).
:mod:`.lmms_model` is the thin ``lmms`` subclass lmms-eval instantiates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import QvlmError

MODEL_ID = "qvlm_export"


def manifest():
    """The ``lmms_eval.models`` entry point's payload: where lmms-eval finds the model class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="qvlm_export.evaluate.lmms_model.QvlmExportLMM")


class BundleLMM:
    """Greedy generation and log-likelihoods over one bundle or engine directory.

    ``mode`` (ONNX Runtime): ``faithful`` (exact integer arithmetic, what ``qvlm-export eval``
    reports by default) or ``fast`` (fused kernels).
    """

    def __init__(self, bundle: str | None = None, engines: str | None = None, mode: str = "faithful",
                 max_new_tokens: int = 8, threads: int | None = None):
        from ..runtime.factory import answerer_for_bundle, answerer_for_engines

        if (bundle is None) == (engines is None):
            raise QvlmError("pass exactly one of bundle=DIR (ONNX Runtime) or engines=DIR (TensorRT) in --model_args")
        if engines is not None:
            self.answerer, self.description = answerer_for_engines(Path(engines), max_new_tokens=int(max_new_tokens))
        else:
            self.answerer, self.description = answerer_for_bundle(
                Path(bundle), mode=mode, threads=None if threads is None else int(threads),
                max_new_tokens=int(max_new_tokens))
        self.default_max_new_tokens = int(max_new_tokens)

    @property
    def processor(self):
        return self.answerer.processor

    def generate(self, images: list, contexts: list[str], until: list[str] | None = None,
                 max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers for one image per context, each cut before the first stop string."""
        self.answerer.max_new_tokens = int(max_new_tokens or self.default_max_new_tokens)
        answers = self.answerer.ask(images, contexts)
        for stop in until or []:
            answers = [a.split(stop)[0] if stop else a for a in answers]
        return answers

    def loglikelihood(self, image, context: str, continuation: str) -> tuple[float, bool]:
        """(log p(continuation | image, context), whether greedy decoding produces exactly it)."""
        from ..load.model import build_prompt
        from ..runtime.generate import position_ids, prompt_embeds
        from ..runtime.images import image_inputs

        prompt = build_prompt(self.processor, context)
        ctx = self.processor(images=[image], text=[prompt], return_tensors="np")
        full = self.processor(images=[image], text=[prompt + continuation], return_tensors="np")
        n_ctx, ids = ctx["input_ids"].shape[1], np.asarray(full["input_ids"], dtype=np.int64)
        if ids.shape[1] <= n_ctx or ids[0, :n_ctx].tolist() != ctx["input_ids"][0].tolist():
            raise QvlmError(f"the continuation {continuation!r} adds no tokens after the prompt, or changes how the "
                            "prompt tokenizes; give it a leading space or a word the tokenizer knows")
        runner = self.answerer.runner
        if not self.answerer._active:
            runner.activate()
            self.answerer._active = True
        mask = np.asarray(full["attention_mask"], dtype=np.int64)
        embeds = prompt_embeds(runner, ids, image_inputs(runner.info, full))
        logits, _ = runner.decode(embeds, mask, position_ids(mask), runner.info.empty_past(1))
        if logits.shape[1] != ids.shape[1]:
            raise QvlmError(f"{runner.name} returns logits for the last position only (TensorRT engines built with "
                            "decoder_logits: last); score log-likelihoods on the ONNX bundle, or rebuild the engines "
                            "with decoder_logits: all in the profile")
        scores = logits[0, n_ctx - 1:-1].astype(np.float64)  # the logits that predict each continuation token
        top = scores.max(-1, keepdims=True)
        logp = scores - top - np.log(np.exp(scores - top).sum(-1, keepdims=True))
        target = ids[0, n_ctx:]
        return float(logp[np.arange(len(target)), target].sum()), bool((scores.argmax(-1) == target).all())

    def close(self) -> None:
        self.answerer.close()
