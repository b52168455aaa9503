"""ZeRO-2 with 2 processes against one process with the same global batch (SlimFit on).

Launched by tests/test_deepspeed_global_batch.py as
``torchrun --nproc_per_node 2 zero2_global_batch_worker.py OUT_DIR OPTIMIZER [OPTIMIZER ...]``
(OPTIMIZER: ``sgd`` or ``adamw``; each runs in this launch, Accelerate's state reset in
between). Rank r trains on ``batch(step, r)``; the single-process reference (built by the test
with the same functions) trains on both ranks' batches at once. No dropout and no activation
compression: a quantization scale taken over half the batch is not the one taken over all of it.
Rank 0 writes the decision of every step and the full fp32 weights after STEPS steps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

STEPS, MICRO = 5, 4
CONFIG = {"seed": 3, "scheduler": {"name": "ils", "freeze_ratio": 0.5}, "compression": "none",
          "units": {"always_train": ["classifier.*"]}}
LR = {"sgd": 0.1, "adamw": 1e-3}


def build_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def batch(step: int, rank: int) -> dict:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, 99, (MICRO, 12), generator=generator)
    return {"input_ids": ids, "labels": (ids[:, 0] < 50).long()}


def torch_optimizer(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR[kind], momentum=0.9)
    return torch.optim.AdamW(params, lr=LR[kind], weight_decay=0.01)


def run(kind: str, out: Path) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
    from deepspeed.utils import safe_get_full_fp32_param

    from slimfit_accel import SlimFit

    slimfit = SlimFit.from_config(CONFIG)
    model = slimfit.prepare_model(build_model())
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 2000, "allgather_bucket_size": 2000},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config),
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    optimizer = torch_optimizer(kind, model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    slimfit.attach(accelerator, model, optimizer, total_steps=STEPS)
    decisions = []
    for step in range(STEPS):
        with slimfit.step():
            decisions.append(list(slimfit.controller.trainable))
            accelerator.backward(model(**batch(step, accelerator.process_index)).loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    weights = {n: safe_get_full_fp32_param(p).clone() for n, p in model.module.named_parameters()}
    if accelerator.is_main_process:
        torch.save({"decisions": decisions, "weights": weights,
                    "basic_optimizer": type(optimizer.optimizer.optimizer).__name__}, out / f"{kind}.pt")
    accelerator.wait_for_everyone()


def main() -> None:
    from accelerate.state import AcceleratorState, GradientState

    out = Path(sys.argv[1])
    for kind in sys.argv[2:]:
        run(kind, out)
        AcceleratorState._reset_state()
        GradientState._reset_state()
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)



if __name__ == "__main__":
    from worker_exit import exit_cleanly

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
    exit_cleanly()
