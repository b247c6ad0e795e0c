"""Train the embedded tiny LLaVA model on the synthetic shapes-VQA task (seeded, CPU).

    python tools/train_embedded.py --out qvlm_export/assets/tiny-llava-shapes

Two stages, because a vision tower learns slowly through a 1-2 token answer loss:

1. vision pre-training: the CLIP tower's patch features, mean-pooled over each cell of
   the 2x2 scene grid, predict that cell's shape and colour (two linear heads);
2. end-to-end LLaVA training on the answer tokens, keeping the cell loss as an
   auxiliary term (weight ``--aux-weight``) so the tower does not drift.

The heads are discarded: the output is a plain Hugging Face directory. The script
evaluates greedy exact match on the eval split at the end and writes it to
``training.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qvlm_export.data.synthetic import GRID, QUESTION_TYPES, SPLIT_SEEDS, make_sample, make_split, scene_targets  # noqa: E402
from qvlm_export.evaluate.accuracy import evaluate  # noqa: E402
from qvlm_export.evaluate.torch_answerer import TorchAnswerer  # noqa: E402
from qvlm_export.load.model import LoadedVLM, build_prompt  # noqa: E402
from qvlm_export.load.tiny import build_processor, build_tokenizer, tiny_llava_config  # noqa: E402


def encode_pool(processor, start: int, n: int, answer_prefix: str = " "):
    """Pixel tensors, token ids (prompt + answer + eos, right padded), labels and cell targets.

    ``answer_prefix``: what separates the prompt from the answer (" " after "ASSISTANT:"; nothing
    after a chat template's newline).
    """
    tok = processor.tokenizer
    samples = [make_sample(SPLIT_SEEDS["train"], i) for i in range(start, start + n)]
    pixels = processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
    prompt_cache: dict[str, list[int]] = {}
    seqs, labels = [], []
    for s in samples:
        if s.question not in prompt_cache:
            prompt = build_prompt(processor, s.question)
            prompt_cache[s.question] = list(processor(text=[prompt], images=[s.image])["input_ids"][0])
        p = prompt_cache[s.question]
        a = tok(answer_prefix + s.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, seqs))
    ids = torch.full((n, width), tok.pad_token_id)
    lab = torch.full((n, width), -100)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (s, l_) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(l_)] = torch.tensor(l_)
        mask[i, :len(s)] = 1
    targets = torch.from_numpy(np.stack([scene_targets(SPLIT_SEEDS["train"], i) for i in range(start, start + n)]))
    return pixels, ids, mask, lab, targets


class CellHeads(nn.Module):
    """Per-cell shape/colour classifiers on pooled patch features (training only)."""

    def __init__(self, hidden: int, patches_per_side: int):
        super().__init__()
        self.side = patches_per_side
        self.shape = nn.Linear(hidden, 4)
        self.color = nn.Linear(hidden, 5)
        # Which cell each patch lies in: keeps absolute position linearly readable in the
        # final features, since RoPE attention in the decoder cannot recover it from values.
        self.where = nn.Linear(hidden, GRID * GRID)
        rows = torch.arange(patches_per_side).repeat_interleave(patches_per_side) // (patches_per_side // GRID)
        cols = torch.arange(patches_per_side).repeat(patches_per_side) // (patches_per_side // GRID)
        self.register_buffer("patch_cell", rows * GRID + cols)

    def forward(self, patch_features: torch.Tensor):
        b, _, h = patch_features.shape
        grid = patch_features.reshape(b, GRID, self.side // GRID, GRID, self.side // GRID, h)
        cells = grid.mean(dim=(2, 4)).reshape(b, GRID * GRID, h)
        return self.shape(cells), self.color(cells), self.where(patch_features)


def cell_loss(heads, features, targets):
    shape_logits, color_logits, where_logits = heads(features)
    ce = nn.functional.cross_entropy
    where_target = heads.patch_cell.expand(features.shape[0], -1)
    return (ce(shape_logits.flatten(0, 1), targets[..., 0].flatten())
            + ce(color_logits.flatten(0, 1), targets[..., 1].flatten())
            + ce(where_logits.flatten(0, 1), where_target.flatten()))


def vision_patches(model, pixels):
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[-1][:, 1:]  # drop CLS: the "default" feature strategy


def one_cycle(step: int, total: int, peak: float, warmup: float = 0.1) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return peak * (step + 1) / w
    return peak * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    config = tiny_llava_config(tokenizer)
    if args.init_from:
        model = LlavaForConditionalGeneration.from_pretrained(args.init_from)
    else:
        model = LlavaForConditionalGeneration(config)
    side = config.vision_config.image_size // config.vision_config.patch_size
    heads = CellHeads(config.vision_config.hidden_size, side)
    t0 = time.time()
    pool = encode_pool(processor, 0, args.pool)
    print(f"encoded {args.pool} training samples in {time.time() - t0:.0f}s", flush=True)
    rng = np.random.default_rng(args.seed)
    log = []

    # Pool sample i has question type i % 5; weighting types oversamples the hard ones.
    type_weight = np.array([args.type_weights.get(t, 1.0) for t in QUESTION_TYPES])
    probs = type_weight[np.arange(args.pool) % len(QUESTION_TYPES)]
    probs = probs / probs.sum()

    def batches(steps):
        for step in range(steps):
            idx = torch.from_numpy(rng.choice(args.pool, size=args.batch, p=probs))
            yield step, [t[idx] for t in pool]

    # Stage 1: vision tower + cell heads only.
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    for step, (pix, _, _, _, tgt) in batches(args.vision_steps):
        for g in opt.param_groups:
            g["lr"] = one_cycle(step, args.vision_steps, args.lr)
        loss = cell_loss(heads, vision_patches(model, pix), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.vision_steps - 1:
            print(f"[vision {step}] cell loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    # Stage 2: everything (or all but a frozen vision tower), answer loss + auxiliary cell loss.
    if args.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable + list(heads.parameters()), lr=args.lr, weight_decay=0.01)
    captured = {}
    hook = model.model.vision_tower.encoder.layers[-1].register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    for step, (pix, ids, mask, lab, tgt) in batches(args.steps):
        for g in opt.param_groups:
            g["lr"] = one_cycle(step, args.steps, args.lr)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=lab)
        aux = cell_loss(heads, captured["h"][:, 1:], tgt) if not args.freeze_vision else out.loss.new_zeros(())
        loss = out.loss + args.aux_weight * aux
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"[joint {step}] answer loss {out.loss.item():.4f} cell {aux.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
            log.append({"step": step, "answer_loss": out.loss.item(), "cell_loss": aux.item()})
    hook.remove()
    train_seconds = time.time() - t0
    model.eval()
    vlm = LoadedVLM(model=model, processor=processor, path=Path(args.out))
    result = evaluate(TorchAnswerer(vlm), make_split("eval"), batch_size=100, progress=False)
    print(f"eval accuracy {result.overall:.4f} {result.by_type}", flush=True)
    out_dir = Path(args.out)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return write_training_record(out_dir, train_seconds, result, args, log)


def write_training_record(out_dir: Path, seconds: float, result, args, log: list) -> dict:
    """``training.json`` beside the weights: what the run was asked, what it took and how it scored."""
    info = {"train_seconds": round(seconds, 1), "threads": args.threads, "eval": result.to_json(),
            "args": vars(args), "torch": torch.__version__, "log": log}
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "qvlm_export/assets/tiny-llava-shapes"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=40000, help="distinct training samples (drawn from the train stream)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vision-steps", type=int, default=800)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--aux-weight", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init-from", default=None, help="continue from a saved checkpoint directory")
    p.add_argument("--freeze-vision", action="store_true", help="train only projector + decoder (continuation)")
    p.add_argument("--type-weights", default="", type=lambda s: {k: float(v) for k, v in (kv.split("=") for kv in s.split(",") if kv)},
                   help="sampling weight per question type, e.g. position=2,presence=1.5")
    train(p.parse_args())


if __name__ == "__main__":
    main()
