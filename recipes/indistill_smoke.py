"""InDistill + Comparative KD smoke runs (issue 6), for ``accelerate launch``.

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 recipes/indistill_smoke.py --smoke --output_dir /tmp/smoke

(two CPU processes talking over gloo; on GPUs use ``accelerate launch --config_file
recipes/configs/accelerate/multi_gpu.yaml``.)

Three short DistillationTrainer runs on random data with random-init models (no downloads):

* ``cnn``: timm resnet34 -> resnet18, InDistill warm-up on layer1 then layer2 (1 step each), then KD.
* ``vit``: open_clip vision towers (a wide ViT with 8px patches -> a narrow ViT with 16px patches, tiny configs in the
  shape of ViT-L-14 -> ViT-S-16), InDistill on residual-stream blocks 0 then 1 (channel selection by the blocks'
  ``mlp.c_proj`` weight rows, token-grid resize), then KD. The towers get a linear head (a classifier over
  ``visual``), so the plain adapter runs them.
* ``ckd_budget``: method ``ckd`` with ``teacher_call_budget=8``: the logged teacher-call count must be 8.

Every process checks that no forward hook survives; the main process writes ``smoke_results.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_cifd import DistillationConfig, DistillationTrainer


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n=16, size=32, num_classes=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i] + 0.05 * torch.randn_like(self.x[i]), "labels": int(self.y[i]),
                "sample_key": f"img{i}"}


class VisionTowerClassifier(nn.Module):
    """An open_clip vision tower + linear head; forward returns (embedding, logits)."""

    def __init__(self, visual: nn.Module, embed_dim: int, num_classes: int):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(embed_dim, num_classes)
        self.embed_dim = embed_dim

    def forward(self, x):
        e = self.visual(x)
        return e, self.head(e)


def vit_tower(width: int, patch: int, layers: int, seed: int, num_classes: int = 10) -> VisionTowerClassifier:
    import open_clip

    torch.manual_seed(seed)
    clip = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=layers, width=width, patch_size=patch, head_width=32),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
    )
    return VisionTowerClassifier(clip.visual, 32, num_classes)


def _args(output_dir: str, **kw) -> DistillationConfig:
    base = dict(output_dir=output_dir, method="kd", per_device_train_batch_size=2, logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-3, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return DistillationConfig(**base)


def _no_hooks(*models: nn.Module) -> bool:
    return all(not m._forward_hooks for model in models for m in model.modules())


def _pair_sequence(trainer) -> list[int]:
    seq = [h["indistill_pair"] for h in trainer.state.log_history if "indistill_pair" in h]
    return [p for k, p in enumerate(seq) if k == 0 or p != seq[k - 1]]


def run_indistill(name: str, teacher: nn.Module, student: nn.Module, layers: list[str], output_dir: str) -> dict:
    args = _args(os.path.join(output_dir, name), max_steps=3, indistill_layers=layers, indistill_unit="step",
                 indistill_durations=[1, 1])
    trainer = DistillationTrainer(student, teacher, args=args, train_dataset=RandomImages())
    trainer.train()
    hooks_removed = _no_hooks(teacher, student)
    assert hooks_removed, f"{name}: forward hooks survived train()"
    pairs = _pair_sequence(trainer)
    assert pairs == [0, 1, -1], f"{name}: schedule {pairs}"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    selected = [None if r.indices is None else int(r.indices.numel()) for r in trainer.indistill.resolved]
    return {"pairs": pairs, "hooks_removed": hooks_removed, "losses": losses, "selected_channels": selected,
            "teacher_calls": trainer.state.log_history[-2].get("teacher_calls")}


def run_ckd_budget(output_dir: str, budget: int = 8) -> dict:
    import timm

    teacher = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    student = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    args = _args(os.path.join(output_dir, "ckd_budget"), method="ckd", teacher_call_budget=budget, max_steps=4)
    trainer = DistillationTrainer(student, teacher, args=args, train_dataset=RandomImages())
    trainer.train()
    logged = [h["teacher_calls"] for h in trainer.state.log_history if "teacher_calls" in h]
    assert logged and all(c == budget for c in logged), logged
    return {"budget": budget, "teacher_calls": logged[-1]}


@dataclass
class SmokeArguments:
    smoke: bool = field(default=True, metadata={"help": "Tiny random-init models and data (the only mode)."})
    output_dir: str = field(default="outputs/indistill_smoke", metadata={"help": "Where smoke_results.json goes."})
    runs: list[str] = field(default_factory=lambda: ["cnn", "vit", "ckd_budget"],
                            metadata={"help": "Runs to do: cnn, vit, ckd_budget."})

    def __post_init__(self):
        if not self.smoke:
            raise SystemExit("indistill_smoke.py has only the smoke mode (tiny random models); --smoke false is not one.")
        unknown = sorted(set(self.runs) - {"cnn", "vit", "ckd_budget"})
        if unknown:
            raise SystemExit(f"--runs: unknown run(s) {unknown}; choose from cnn, vit, ckd_budget.")


def main() -> None:
    from hf_cifd.recipe_args import parse_recipe_args

    (opts,) = parse_recipe_args((SmokeArguments,), prog="indistill_smoke.py")
    torch.set_num_threads(1)
    results = {}
    if "cnn" in opts.runs:
        import timm

        teacher = timm.create_model("resnet34", pretrained=False, num_classes=10)
        student = timm.create_model("resnet18", pretrained=False, num_classes=10)
        results["cnn"] = run_indistill("cnn", teacher, student, ["layer1:layer1", "layer2:layer2"], opts.output_dir)
    if "vit" in opts.runs:
        teacher, student = vit_tower(64, 8, 2, seed=0), vit_tower(32, 16, 2, seed=1)
        layers = [f"visual.transformer.resblocks.{i}:visual.transformer.resblocks.{i}" for i in range(2)]
        results["vit"] = run_indistill("vit", teacher, student, layers, opts.output_dir)
    if "ckd_budget" in opts.runs:
        results["ckd_budget"] = run_ckd_budget(opts.output_dir)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        os.makedirs(opts.output_dir, exist_ok=True)
        with open(os.path.join(opts.output_dir, "smoke_results.json"), "w") as f:
            json.dump(dict(results, num_processes=state.num_processes), f, indent=2)
        print(json.dumps(results))
    from hf_cifd.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    main()
