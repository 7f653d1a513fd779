"""Task `dna`: sequence classification on the output of `titans prepare dna` (docs/design.md §7).

Character tokens (A C G T N; `titans_cli.engine.sequence`), a Titans backbone (LMM by default, as in Table 4) with
masked mean pooling and a linear head, or the GenomicBenchmarks CNN (`task.model = "cnn"`) through the same pipeline.
Options: reverse-complement augmentation (`rc_aug`), averaging both strands at test time (`rc_tta`), class
weights for imbalance. Early stopping and best.pt follow validation MCC. Metrics come from scikit-learn:
accuracy, MCC, macro-F1, AUROC, AUPRC (binary: the second class of the manifest is positive; multiclass: macro
one-vs-rest), the confusion matrix, and in `eval_report` a per-class report and the majority-class reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from data_recipes import output
from tasks.dna_models import GenomicBenchmarksCNN, TitansClassifier, rc_tokens
from titans_cli.engine.config import check_fields
from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.sequence import ALPHABET, PAD_ID, encode
from titans_cli.engine.task import Batch, TaskData


@dataclass(frozen=True)
class DnaConfig:
    """The `[task]` section of a `dna` run."""

    model: Literal["titans", "cnn"] = "titans"  # cnn: the GenomicBenchmarks baseline through the same pipeline
    pooling: Literal["mean", "max", "last"] = "mean"  # over real tokens (mean: HyenaDNA's head); last token
    bins: int = 1  # mean/max pooling per relative-position bin, concatenated (1 = whole sequence; dna_models)
    strands: Literal[1, 2] = 1  # 2: the backbone also reads the reverse complement; features are concatenated
    piece_len: int = 0  # Titans reads sequences in pieces of this many tokens; 0 = the longest training sequence
    rc_aug: bool = False  # replace each training sequence by its reverse complement with probability 1/2
    # Evaluation: average the class probabilities of both strands. Pair it with rc_aug: the reverse complement
    # also mirrors positions, so a model trained on one strand with bins > 1 scores the other one poorly.
    rc_tta: Literal["none", "mean"] = "none"
    class_weight: Literal["none", "auto"] = "none"  # auto: cross-entropy weights n / (k · n_c) from train counts
    head_dropout: float = 0.0
    cnn_length: int = 0  # the CNN's fixed input length; 0 = the longest training sequence
    cnn_crop: Literal["center", "left", "right"] = "center"  # which part of a longer sequence the CNN sees

    def __post_init__(self) -> None:
        checks = [
            ("piece_len", self.piece_len >= 0, "must be >= 0"),
            ("bins", self.bins >= 1, "must be >= 1"),
            ("head_dropout", 0 <= self.head_dropout < 1, "must be in [0, 1)"),
            ("cnn_length", self.cnn_length == 0 or self.cnn_length >= 64, "must be 0 or >= 64 (three conv+pool)"),
        ]
        check_fields("task", self, checks)


class SequenceDataset(Dataset):
    """Encoded sequences as one right-padded uint8 matrix; items are {tokens, length, label, index} tensors."""

    def __init__(self, sequences: list[str], labels: list[int] | None = None) -> None:
        self.lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        width = int(self.lengths.max()) if len(sequences) else 1
        self.tokens = np.full((len(sequences), width), PAD_ID, dtype=np.uint8)
        for i, seq in enumerate(sequences):
            self.tokens[i, : len(seq)] = encode(seq)
        self.labels = np.asarray(labels if labels is not None else [-1] * len(sequences), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Batch:
        return {
            "tokens": torch.from_numpy(self.tokens[i].astype(np.int64)),
            "length": torch.tensor(self.lengths[i]),
            "label": torch.tensor(self.labels[i]),
            "index": torch.tensor(i),
        }


def read_split(data_dir: Path, split: str, classes: list[str]) -> tuple[list[str], list[int], list[str]]:
    """(sequences, label indices, ids) of `split.parquet`; a label outside `classes` is a DataError."""
    path = Path(data_dir) / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path}: no such split; prepare the data with `titans prepare dna`")
    df = pl.read_parquet(path, columns=["id", "sequence", "label"])
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(df["label"].unique().to_list()) - set(index))
    if unknown:
        raise DataError(f"{path}: labels {unknown} are not among the run's classes {classes}")
    return df["sequence"].to_list(), [index[lab] for lab in df["label"].to_list()], df["id"].to_list()


def read_manifest(data_dir: Path) -> dict[str, Any]:
    """The manifest of a `titans prepare dna` folder (also read by dna-lm for its fine-tuning sets)."""
    return output.read_manifest(data_dir, "dna", "titans prepare dna")


def auto_class_weights(counts: list[int]) -> list[float]:
    """Cross-entropy weights n / (k · n_c): every class contributes equally to the loss (sklearn "balanced")."""
    n, k = sum(counts), len(counts)
    return [n / (k * c) if c else 0.0 for c in counts]


def classification_metrics(y: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, Any]:
    """accuracy, mcc, f1_macro, auroc, auprc and the confusion matrix (rows: true class) via scikit-learn.

    AUROC/AUPRC use the second class as positive for two classes and macro one-vs-rest otherwise; they are
    None when the labels hold a single class (undefined).
    """
    from sklearn import metrics as skm

    pred = probs.argmax(1)
    labels = list(range(n_classes))
    out: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "mcc": float(skm.matthews_corrcoef(y, pred)),
        "f1_macro": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "auroc": None,
        "auprc": None,
    }
    if len(np.unique(y)) > 1:
        if n_classes == 2:
            out["auroc"] = float(skm.roc_auc_score(y, probs[:, 1]))
            out["auprc"] = float(skm.average_precision_score(y, probs[:, 1]))
        else:
            present = np.unique(y)  # one-vs-rest is undefined for a class absent from the labels
            onehot = np.eye(n_classes)[y][:, present]
            out["auroc"] = float(skm.roc_auc_score(onehot, probs[:, present], average="macro"))
            out["auprc"] = float(skm.average_precision_score(onehot, probs[:, present], average="macro"))
    out["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=labels).tolist()
    return out


@torch.no_grad()
def predict_proba(model: nn.Module, loader: Any, rc_tta: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities `[N, classes]`, labels, dataset indices) over every batch of `loader`, in loader order."""
    probs, labels, indices = [], [], []
    for batch in loader:
        tokens, lengths = batch["tokens"], batch["length"]
        p = torch.softmax(model(tokens, lengths).float(), -1)
        if rc_tta == "mean":
            p = 0.5 * (p + torch.softmax(model(rc_tokens(tokens, lengths), lengths).float(), -1))
        probs.append(p.cpu())
        labels.append(batch["label"].cpu())
        indices.append(batch["index"].cpu())
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), torch.cat(indices).numpy()


class DnaTask:
    """`dna`: see the module docstring. Primary metric: validation MCC (higher is better)."""

    name = "dna"
    config_cls = DnaConfig
    primary_metric = "mcc"
    higher_is_better = True

    def load(self, cfg: Any, data_dir: Path) -> TaskData:
        """Splits of a prepared folder; `meta` keeps the alphabet, classes, class weights and lengths."""
        manifest = read_manifest(data_dir)
        classes = list(manifest["classes"])
        splits = {}
        for name in ("train", "val", "test"):
            if name == "test" and not (Path(data_dir) / "test.parquet").is_file():
                continue
            seqs, labels, _ = read_split(data_dir, name, classes)
            splits[name] = (seqs, labels)
        train_len = max(len(s) for s in splits["train"][0])
        counts = [int(np.sum(np.asarray(splits["train"][1]) == i)) for i in range(len(classes))]
        meta = {
            "task": "dna",
            "alphabet": ALPHABET,
            "pad_id": PAD_ID,
            "classes": classes,
            "train_class_counts": counts,
            "class_weights": auto_class_weights(counts) if cfg.task.class_weight == "auto" else None,
            "max_train_len": train_len,
            "splits": {n: {"rows": len(s[0])} for n, s in splits.items()},
            "inputs": manifest.get("inputs", []),
        }
        data = {n: SequenceDataset(s, lab) for n, (s, lab) in splits.items()}
        return TaskData(data["train"], data["val"], data.get("test"), meta)

    def build_model(self, cfg: Any, meta: dict[str, Any]) -> nn.Module:
        t = cfg.task
        n_classes = len(meta["classes"])
        if t.model == "cnn":
            model: nn.Module = GenomicBenchmarksCNN(n_classes, t.cnn_length or meta["max_train_len"], t.cnn_crop)
        else:
            piece = t.piece_len or meta["max_train_len"]
            model = TitansClassifier(cfg.model, n_classes, t.pooling, t.bins, piece, t.head_dropout, t.strands)
        weights = meta.get("class_weights")
        # Buffers (not saved): the loss and evaluation read these options from the model they are handed.
        model.register_buffer("class_weights", torch.tensor(weights or [1.0] * n_classes), persistent=False)
        model.rc_aug = t.rc_aug
        model.rc_tta = t.rc_tta
        return model

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        tokens, lengths = batch["tokens"], batch["length"]
        if model.rc_aug:
            flip = torch.rand(tokens.shape[0], device=tokens.device) < 0.5  # seeded by the engine's torch RNG
            tokens = torch.where(flip.unsqueeze(1), rc_tokens(tokens, lengths), tokens)
        logits = model(tokens, lengths)
        return nn.functional.cross_entropy(logits.float(), batch["label"], weight=model.class_weights)

    def evaluate(self, model: nn.Module, loader: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """Metrics over every sample of `loader` once, plus the mean cross-entropy (unweighted)."""
        probs, labels, _ = predict_proba(model, loader, model.rc_tta)
        out = classification_metrics(labels, probs, len(meta["classes"]))
        picked = probs[np.arange(len(labels)), labels]
        out["loss"] = float(-np.log(np.clip(picked, 1e-12, None)).mean())
        return out

    def eval_report(
        self, loaded: Any, split: str = "test", data_dir: Path | None = None, **opts: Any
    ) -> dict[str, Any]:
        """Full report on one split: metrics, per-class precision/recall/F1, and the majority-class reference.

        The reference always predicts the most frequent training class: its accuracy is that class's share of
        the split, and its MCC is 0 (chance).
        """
        from sklearn.metrics import precision_recall_fscore_support

        from titans_cli.engine.evaluate import eval_loader

        unknown = sorted(set(opts) - {"rc_tta", "batch_size"})
        if unknown:
            raise UsageError(f"--opt {unknown[0]}: unknown for dna; known: rc_tta=none|mean, batch_size=N")
        mode = str(opts.get("rc_tta", loaded.cfg.task.rc_tta))
        if mode not in ("none", "mean"):
            raise UsageError(f"--opt rc_tta={mode}: expected none or mean")
        try:
            batch_size = int(opts.get("batch_size", 64))
        except ValueError:
            raise UsageError(f"--opt batch_size={opts['batch_size']}: expected an integer") from None
        meta = loaded.meta
        classes = meta["classes"]
        data_dir = Path(data_dir or loaded.cfg.run.data)
        seqs, labels, _ = read_split(data_dir, split, classes)
        device = next(loaded.model.parameters()).device
        loader = eval_loader(SequenceDataset(seqs, labels), batch_size, device)
        probs, y, _ = predict_proba(loaded.model, loader, mode)
        report: dict[str, Any] = {"split": split, "data": str(data_dir), "rc_tta": mode, "classes": classes}
        report |= classification_metrics(y, probs, len(classes))
        p, r, f, s = precision_recall_fscore_support(
            y, probs.argmax(1), labels=list(range(len(classes))), zero_division=0
        )
        report["per_class"] = {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        }
        majority = int(np.argmax(meta["train_class_counts"]))
        reference = classification_metrics(y, np.eye(len(classes))[np.full(len(y), majority)], len(classes))
        report["majority_class"] = {
            "class": classes[majority],
            "accuracy": reference["accuracy"],
            "mcc": reference["mcc"],
            "f1_macro": reference["f1_macro"],
        }
        return report


def predict_sequences(
    loaded: Any, sequences: list[str], batch_size: int = 64, rc_tta: str | None = None
) -> tuple[np.ndarray, int]:
    """Class probabilities `[N, classes]` of normalised sequences, in input order, plus how many sequences the
    model had to crop (only the CNN crops; Titans reads long sequences through its memory in pieces).

    Sequences are batched by length (less padding) and the rows put back in input order.
    """
    from titans_cli.engine.evaluate import eval_loader

    if not sequences:
        return np.zeros((0, len(loaded.meta["classes"]))), 0
    model = loaded.model
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    probs = np.zeros((len(sequences), len(loaded.meta["classes"])))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        loader = eval_loader(SequenceDataset([sequences[i] for i in rows]), batch_size, device)
        p, _, idx = predict_proba(model, loader, rc_tta or loaded.cfg.task.rc_tta)
        probs[[rows[i] for i in idx]] = p
    cropped = sum(len(s) > model.input_len for s in sequences) if isinstance(model, GenomicBenchmarksCNN) else 0
    return probs, cropped


def classify_rows(
    loaded: Any, rows: pl.DataFrame, batch_size: int = 64, rc_tta: str | None = None
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """`titans classify`: the output table of `rows` (from `data_recipes.dna.read_sequences`) and a summary.

    The table (docs/conventions.md §13): `id`, then `chrom start end strand` for BED input, `label` when the input has
    one, `pred` and one `prob_<class>` column per class, rows in input order. The summary counts the sequences,
    the predicted classes, those read through the memory in pieces (`streamed`, longer than `piece_len`) and those
    the CNN cropped.
    """
    classes = loaded.meta["classes"]
    seqs = rows["sequence"].to_list()
    piece = getattr(loaded.model, "piece_len", 0)
    long = sum(len(s) > piece for s in seqs) if piece else 0
    probs, cropped = predict_sequences(loaded, seqs, batch_size, rc_tta)
    keep = ["id"]
    if "chrom" in rows.columns:  # BED input
        keep += ["chrom", "start", "end", "strand"]
    if rows["label"].null_count() < rows.height:
        keep.append("label")
    table = rows.select(keep).with_columns(
        pl.Series("pred", [classes[i] for i in probs.argmax(1)]),
        *(pl.Series(f"prob_{c}", probs[:, i]) for i, c in enumerate(classes)),
    )
    counts = {c: int((probs.argmax(1) == i).sum()) for i, c in enumerate(classes)}
    summary = {"sequences": len(seqs), "predicted": counts, "streamed": long, "cropped": cropped, "piece_len": piece}
    return table, summary


TASK = DnaTask()
