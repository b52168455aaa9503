"""Test-set scores each epoch: accuracy and macro-F1, next to the majority-class baseline.

The baseline answers the training set's most frequent class for every test row. A model whose
accuracy equals the majority share has learnt nothing a constant would not; the printed line
says so rather than leaving a 0.51 to look like a result.

Example::

    scores = evaluate(accelerator, model, test_dl, num_classes=2)   # {'accuracy': .., 'macro_f1': ..}
    print(describe(scores, baseline_scores(majority, test_labels, 2)))
"""

from __future__ import annotations

import torch


@torch.no_grad()
def evaluate(accelerator, model, test_dl, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 over the whole test set, gathered from every process (no duplicates)."""
    model.eval()
    predictions, labels = [], []
    for batch in test_dl:
        predicted = model(**batch).logits.argmax(dim=-1)
        predicted, truth = accelerator.gather_for_metrics((predicted, batch["labels"]))
        predictions.append(predicted.cpu())
        labels.append(truth.cpu())
    model.train()
    if not labels:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    return classification_scores(torch.cat(predictions), torch.cat(labels), num_classes)


def classification_scores(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, and F1 averaged over the classes that occur in labels or predictions (as scikit-learn's macro)."""
    predictions, labels = predictions.long(), labels.long()
    accuracy = (predictions == labels).float().mean().item() if labels.numel() else 0.0
    f1s = []
    for c in range(num_classes):
        tp = ((predictions == c) & (labels == c)).sum().item()
        fp = ((predictions == c) & (labels != c)).sum().item()
        fn = ((predictions != c) & (labels == c)).sum().item()
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}


def baseline_scores(majority: int, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Scores of answering ``majority`` for every row."""
    labels = torch.as_tensor(labels)
    return classification_scores(torch.full_like(labels, majority), labels, num_classes)


def describe(scores: dict[str, float], baseline: dict[str, float], majority_name: str) -> str:
    """One line: the scores, the baseline's, and a flag when accuracy is no better than the baseline."""
    line = (f"accuracy {scores['accuracy']:.3f}  macro-F1 {scores['macro_f1']:.3f}  |  majority-class baseline "
            f"(always {majority_name!r}): accuracy {baseline['accuracy']:.3f}  macro-F1 {baseline['macro_f1']:.3f}")
    if scores["accuracy"] <= baseline["accuracy"] + 1e-9:
        line += "  <- NOT above the majority baseline"
    return line
