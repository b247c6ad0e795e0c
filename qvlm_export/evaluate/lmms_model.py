"""The ``lmms`` subclass lmms-eval instantiates for ``--model qvlm_export`` (imports lmms-eval; see :mod:`.lmms`)."""

from __future__ import annotations

from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from .lmms import BundleLMM


class QvlmExportLMM(lmms):
    """An exported bundle on ONNX Runtime (``bundle=DIR``) or engines on TensorRT (``engines=DIR``).

    ``--model_args bundle=DIR[,mode=faithful|fast][,max_new_tokens=N][,threads=N]``;
    ``--batch_size`` questions are answered per batch. One image per question.
    """

    def __init__(self, bundle: str | None = None, engines: str | None = None, mode: str = "faithful",
                 max_new_tokens: int = 8, threads: int | None = None, batch_size: int | str = 1,
                 **harness: Any) -> None:
        super().__init__()
        self.core = BundleLMM(bundle=None if bundle is None else str(bundle),
                              engines=None if engines is None else str(engines), mode=str(mode),
                              max_new_tokens=int(max_new_tokens), threads=threads)
        self.batch_size = max(int(batch_size) if str(batch_size).isdigit() else 1, 1)

    def _visual(self, doc_to_visual, task: str, split: str, doc_id: int):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1:
            raise ValueError(f"qvlm_export answers one image per question; {task} doc {doc_id} has {len(visuals)}")
        return visuals[0].convert("RGB")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, ``--batch_size`` at a time (left padded, as ``qvlm-export eval`` batches)."""
        answers: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start:start + self.batch_size]]
            gen_kwargs = chunk[0][1]  # one task's requests share them
            until = gen_kwargs.get("until") or []
            answers += self.core.generate([self._visual(v, t, s, i) for _, _, v, i, t, s in chunk],
                                          [c for c, *_ in chunk],
                                          until=[until] if isinstance(until, str) else list(until),
                                          max_new_tokens=gen_kwargs.get("max_new_tokens"))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            results.append(self.core.loglikelihood(self._visual(doc_to_visual, task, split, doc_id), context,
                                                   continuation))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("qvlm_export answers single-round questions (generate_until)")
