"""The reference the ``master_weights: host`` tests compare with: mixed-precision AdamW as LLMs
train, written out plainly (bf16 model, fp32 master copies stepped by torch AdamW on the fp32
cast of the bf16 gradients, each master rounded back into its bf16 weight), and a tiny Llama."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

LR, WEIGHT_DECAY = 1e-2, 0.1


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=2 * hidden, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def lm_batch(seed: int, batch: int = 4, length: int = 12, vocab: int = 64) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    return {"input_ids": ids, "labels": ids}


class ReferenceMixedPrecision:
    """``model`` (fp32 as built) becomes bf16; ``masters`` are its fp32 copies, in parameter order,
    stepped by ``optimizer``. ``step()`` after backward: masters take the fp32 cast of each bf16
    gradient (parameters without one are skipped, as AdamW skips them), AdamW steps, every
    master is rounded into its bf16 weight."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        self.masters = [torch.nn.Parameter(p.detach().clone().float()) for p in model.parameters()]
        for param in model.parameters():
            param.data = param.data.to(torch.bfloat16)
        self.optimizer = torch.optim.AdamW(self.masters, lr=LR, weight_decay=WEIGHT_DECAY)

    def params(self) -> list[torch.nn.Parameter]:
        module = getattr(self.model, "module", self.model)  # DDP
        return list(module.parameters())

    def freeze(self, trained: set[str]) -> None:
        """Train exactly the named parameters (the decision the SlimFit run took at this step)."""
        for name, param in zip(self.names, self.params()):
            param.requires_grad_(name in trained)

    def step(self) -> None:
        for param, master in zip(self.params(), self.masters):
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, master in zip(self.params(), self.masters):
                param.copy_(master)


def trained_names(model: torch.nn.Module) -> set[str]:
    """Parameters that train in this step (SlimFit has applied its decision)."""
    module = getattr(model, "module", model)
    return {name for name, p in module.named_parameters() if p.requires_grad}


def compare(params: Sequence[torch.Tensor], masters_of: Callable, state_of: Callable, reference: ReferenceMixedPrecision) -> dict:
    """Whether bf16 weights, fp32 masters and AdamW state equal the reference's, bit for bit."""
    weights = all(a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in zip(params, reference.params()))
    masters = all(torch.equal(masters_of(p).cpu(), m.detach().cpu()) for p, m in zip(params, reference.masters))
    states, entries = True, 0
    for param, master in zip(params, reference.masters):
        mine, theirs = state_of(param), reference.optimizer.state.get(master, {})
        entries += len(theirs)
        states &= mine.keys() == theirs.keys() and all(
            mine[k].dtype == theirs[k].dtype and torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in theirs
        )
    return {"weights_equal": bool(weights), "masters_equal": bool(masters), "state_equal": bool(states), "state_entries": entries}


def straight_and_resumed(config: dict, checkpoint_dir, steps: int):
    """Two runs of ``steps`` bf16 steps through Accelerate on ``tiny_llama`` with SlimFit ``config``:
    one straight through, one saved with ``save_state`` halfway and resumed in a fresh setup.
    Returns ``(straight, resumed)``, each ``(slimfit, model, optimizer, accelerator)``.
    Needs Accelerate's state reset around it (the ``fresh_accelerate_state`` fixture)."""
    from accelerate import Accelerator

    from slimfit_accel import SlimFit

    def setup():
        slimfit = SlimFit.from_config(config)
        model = slimfit.prepare_model(tiny_llama())
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        model, optimizer = accelerator.prepare(model, optimizer)
        slimfit.attach(accelerator, model, optimizer)
        return slimfit, model, optimizer, accelerator

    def run(slimfit, model, optimizer, accelerator, count, first):
        for step in range(first, first + count):
            with slimfit.step():
                accelerator.backward(model(**lm_batch(step)).loss)
                optimizer.step()
                optimizer.zero_grad()

    half = steps // 2
    straight = setup()
    run(*straight, steps, 0)
    first = setup()
    run(*first, half, 0)
    first[3].save_state(checkpoint_dir)
    resumed = setup()
    resumed[3].load_state(checkpoint_dir)
    run(*resumed, steps - half, half)
    return straight, resumed
