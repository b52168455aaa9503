"""Logits memory of a causal LM's training step, standard loss vs ``chunked_loss``, on any device.

One forward + backward of a random-init model (SmolLM2-135M geometry by default: hidden 576,
vocabulary 49152, tied head; only 2 layers, since the layers do not change the head's figures).
An allocation probe sees every tensor every op creates, forward and backward, and reports for
tensors with a vocabulary dimension (the weight's own shape aside): the largest one created, and
the peak of those alive at once (by storage); plus the bytes autograd saves for backward.

    python benchmarks/chunked_loss_memory.py                 # 8 x 512 tokens, fp32, chunks of 1024
    python benchmarks/chunked_loss_memory.py --chunk-size 256 --json runs/chunked_loss.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from slimfit_accel.chunked_loss import enable_chunked_loss
from slimfit_accel.compression import CompressionEngine, CompressionPolicy


class VocabTensors(TorchDispatchMode):
    """Largest and peak-alive bytes of the tensors ops create that have a ``vocab`` dimension."""

    def __init__(self, vocab: int, weight_shapes: set[tuple[int, ...]]):
        super().__init__()
        self.vocab, self.weight_shapes = vocab, weight_shapes
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.largest = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and self.vocab in leaf.shape and tuple(leaf.shape) not in self.weight_shapes:
                storage = leaf.untyped_storage()
                self.largest = max(self.largest, leaf.numel() * leaf.element_size())
                self.alive.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.alive = {ptr: entry for ptr, entry in self.alive.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.alive.values()))
        return out


def measure(model, batch, vocab: int, hidden: int) -> dict[str, float]:
    counting = CompressionEngine(model, CompressionPolicy(rules=(), default={"name": "none"}), swap_layernorm=False).attach()
    probe = VocabTensors(vocab, {(vocab, hidden), (hidden, vocab)})
    start = time.perf_counter()
    with counting.step(), probe:
        loss = model(**batch).loss
        loss.backward()
    seconds = time.perf_counter() - start
    counting.detach()
    return {
        "loss": loss.item(),
        "largest_vocab_tensor_MB": probe.largest / 2**20,
        "peak_vocab_tensors_alive_MB": probe.peak / 2**20,
        "saved_activations_MB": counting.stats.raw_bytes / 2**20,
        "seconds": seconds,
    }


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=args.length, tie_word_embeddings=True,
    )
    standard = LlamaForCausalLM(config)
    chunked = enable_chunked_loss(copy.deepcopy(standard), chunk_size=args.chunk_size, backend="torch")
    ids = torch.randint(0, config.vocab_size, (args.batch, args.length))
    batch = {"input_ids": ids, "labels": ids}
    results = {"tokens": ids.numel(), "vocab": config.vocab_size, "hidden": config.hidden_size, "chunk_size": args.chunk_size}
    for name, model in (("standard", standard), ("chunked", chunked)):
        results[name] = measure(model, batch, config.vocab_size, config.hidden_size)
    grad_error = max(
        ((a.grad - b.grad).norm() / b.grad.norm()).item() for a, b in zip(chunked.parameters(), standard.parameters())
    )
    results["worst_relative_grad_error"] = grad_error
    print(f"{ids.numel()} tokens x {config.vocab_size} words, fp32, {args.layers} layers, chunks of {args.chunk_size} tokens")
    print(f"{'':10s} {'largest vocab tensor':>22s} {'peak alive':>12s} {'saved for bwd':>14s} {'seconds':>8s}")
    for name in ("standard", "chunked"):
        r = results[name]
        print(f"{name:10s} {r['largest_vocab_tensor_MB']:19.1f} MB {r['peak_vocab_tensors_alive_MB']:9.1f} MB "
              f"{r['saved_activations_MB']:11.1f} MB {r['seconds']:8.1f}")
    print(f"loss {results['standard']['loss']:.6f} vs {results['chunked']['loss']:.6f}; worst relative gradient error {grad_error:.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
