"""Tasks `dna` and `dna-lm`: tokens, reverse complement on batches, pooling, streaming in pieces, batch
invariance, metrics, the label mapping through a checkpoint, and next-base pretraining with weight transfer.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_recipes.dna import DnaPrepareOptions, prepare
from tasks import get_task
from tasks.dna import TASK, DnaConfig, SequenceDataset, auto_class_weights, classification_metrics, predict_sequences
from tasks.dna_lm import TASK as LM_TASK
from tasks.dna_lm import DnaLmConfig, FastaWindows, split_contigs, subtract
from tasks.dna_models import GenomicBenchmarksCNN, TitansClassifier, rc_tokens
from titans_cli.engine import train
from titans_cli.engine.checkpoint import load_run, transfer_weights
from titans_cli.engine.config import ModelConfig, RunConfig, RunSection, TrainConfig
from titans_cli.engine.errors import DataError, UsageError
from titans_cli.engine.sequence import PAD_ID, decode, reverse_complement

FIX = Path(__file__).parents[1] / "fixtures" / "dna"
TINY = ModelConfig(dim=16, n_layers=1, heads=2, chunk_size=4, memory_expansion=2, n_persistent=2, ffn_mult=2)


def tiny_run(task: str, data: Path, task_cfg: object, steps: int = 2, init_from: str = "") -> RunConfig:
    return RunConfig(
        run=RunSection(task=task, data=str(data)),
        model=TINY,
        train=TrainConfig(batch_size=8, max_steps=steps, lr=3e-3, init_from=init_from),
        task=task_cfg,
    )


def batch_of(seqs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ds = SequenceDataset(seqs)
    return torch.from_numpy(ds.tokens.astype(np.int64)), torch.from_numpy(ds.lengths)


def test_tokens_round_trip_with_right_padding() -> None:
    ds = SequenceDataset(["ACGTN", "GG", "T"], [1, 0, 1])
    assert ds.tokens.shape == (3, 5) and ds.lengths.tolist() == [5, 2, 1]
    assert [decode(row) for row in ds.tokens.tolist()] == ["ACGTN", "GG", "T"]
    assert ds.tokens[1].tolist() == [2, 2, PAD_ID, PAD_ID, PAD_ID]
    item = ds[1]
    assert item["label"].item() == 0 and item["length"].item() == 2 and item["index"].item() == 1


def test_rc_tokens_matches_the_string_reverse_complement() -> None:
    seqs = ["ACGTNAC", "GGAT", "C"]
    tokens, lengths = batch_of(seqs)
    out = rc_tokens(tokens, lengths)
    assert [decode(row) for row in out.tolist()] == [reverse_complement(s) for s in seqs]
    assert (out[2, 1:] == PAD_ID).all()
    assert torch.equal(rc_tokens(out, lengths), tokens)


def classifier(variant: str = "lmm", bins: int = 1, pooling: str = "mean", strands: int = 1) -> TitansClassifier:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.__dict__, "variant": variant, "window": 8, "segment_len": 8})
    return TitansClassifier(cfg, 3, pooling, bins, piece_len=0, head_dropout=0.0, strands=strands).eval()


@pytest.mark.parametrize("variant", ["lmm", "mag"])
def test_long_sequences_streamed_in_pieces_equal_one_call(variant: str) -> None:
    model = classifier(variant, bins=3)
    torch.manual_seed(1)
    seqs = ["".join("ACGT"[i] for i in torch.randint(0, 4, (n,)).tolist()) for n in (37, 23, 9)]
    tokens, lengths = batch_of(seqs)
    with torch.no_grad():
        whole = model.features(tokens, lengths, piece_len=64)
        for piece in (5, 16):
            assert torch.allclose(model.features(tokens, lengths, piece_len=piece), whole, atol=1e-5), piece


def test_predictions_do_not_depend_on_batch_size_or_neighbours() -> None:
    for pooling, strands in (("mean", 1), ("max", 1), ("last", 1), ("mean", 2)):
        model = classifier(bins=2, pooling=pooling, strands=strands)
        seqs = ["ACGTACGTAC", "GGG", "TTTTACGATCGATCGAAC", "A"]
        tokens, lengths = batch_of(seqs)
        with torch.no_grad():
            together = model(tokens, lengths)
            alone = torch.cat([model(*batch_of([s])) for s in seqs])
        assert torch.allclose(together, alone, atol=1e-5), pooling


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_pooling_bins_cover_relative_positions(pooling: str) -> None:
    model = classifier(bins=4, pooling=pooling)
    tokens, lengths = batch_of(["ACGTTGCAACGTAGGCTAGCATG"])  # 23 positions: bins of 6, 6, 6, 5
    reduce = {"mean": lambda t: t.mean(0), "max": lambda t: t.amax(0)}[pooling]
    with torch.no_grad():
        y, _ = model.backbone(model.embed(tokens))
        expected = torch.cat([reduce(y[0, [p for p in range(23) if p * 4 // 23 == k]]) for k in range(4)])
        assert torch.allclose(model.features(tokens, lengths)[0], expected, atol=1e-6)
        assert torch.allclose(model.features(tokens, lengths, piece_len=5)[0], expected, atol=1e-5)


def test_two_strand_features_swap_under_reverse_complement() -> None:
    model = classifier(bins=3, strands=2)
    seqs = ["ACGTTGCAACGTAGGCTAGCATGA", "GATTACA"]
    with torch.no_grad():
        fwd = model.features(*batch_of(seqs)).view(2, 3, 2, -1)  # [B, bins, strand, dim]
        rev = model.features(*batch_of([reverse_complement(s) for s in seqs])).view(2, 3, 2, -1)
        streamed = model.features(*batch_of(seqs), piece_len=5).view(2, 3, 2, -1)
    # Reading the other strand first swaps the two halves and mirrors the bins: an exact symmetry.
    assert torch.allclose(rev, fwd.flip(1).flip(2), atol=1e-5)
    assert torch.allclose(streamed, fwd, atol=1e-5)


def test_cnn_reads_a_fixed_length_window() -> None:
    cnn = GenomicBenchmarksCNN(2, input_len=64, crop="center").eval()
    tokens, lengths = batch_of(["A" * 10 + "C" * 64 + "G" * 10, "T" * 5])
    fitted = cnn.fit_length(tokens, lengths)
    assert decode(fitted[0].tolist()) == "C" * 64 and decode(fitted[1].tolist()) == "TTTTT"
    assert cnn(tokens, lengths).shape == (2, 2)
    with pytest.raises(UsageError, match="cnn_length"):
        DnaConfig(cnn_length=16)


def test_metrics_hand_computed_and_majority_reference() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    m = classification_metrics(y, probs, 2)
    assert m["accuracy"] == 0.75 and m["confusion_matrix"] == [[1, 1], [0, 2]]
    assert m["mcc"] == pytest.approx(1 / math.sqrt(3))  # (1·2 - 1·0) / sqrt(2·3·1·2)
    assert m["auroc"] == 1.0 and m["auprc"] == 1.0  # positives score 0.7, 0.8 above both negatives
    multi = classification_metrics(np.array([0, 1, 2, 2]), np.eye(3)[[0, 1, 2, 0]], 3)
    assert multi["accuracy"] == 0.75 and multi["confusion_matrix"][2] == [1, 0, 1]
    single = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), 2)
    assert single["auroc"] is None and single["auprc"] is None
    assert auto_class_weights([30, 10]) == [40 / 60, 40 / 20]


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny labelled FASTA with string classes, prepared with a stratified validation split."""
    root = tmp_path_factory.mktemp("dna3")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(36):
        label = ("enhancer", "promoter", "zz_other")[i % 3]
        seq = "".join(rng.choice(list("ACGT"), size=int(rng.integers(12, 30))))
        lines += [f">r{i} label={label}", seq]
    (root / "seqs.fa").write_text("\n".join(lines) + "\n")
    prepare(DnaPrepareOptions(fasta=root / "seqs.fa", label_regex=r"label=(\w+)", val_frac=0.25), root / "data")
    return root


def test_label_mapping_survives_a_checkpoint_round_trip(three_classes: Path) -> None:
    run_dir = three_classes / "run"
    cfg = tiny_run("dna", three_classes / "data", DnaConfig(class_weight="auto", bins=2))
    train.run(cfg, TASK, run_dir, overwrite=True, quiet=True)
    loaded = load_run(run_dir, get_task=get_task)
    assert loaded.meta["classes"] == ["enhancer", "promoter", "zz_other"]
    assert loaded.meta["class_weights"] == pytest.approx([1.0, 1.0, 1.0])  # 9 training rows of each class
    assert torch.equal(loaded.model.class_weights, torch.ones(3))
    data = TASK.load(cfg, three_classes / "data")
    fresh = TASK.build_model(cfg, data.meta)
    fresh.load_state_dict(loaded.model.state_dict())
    seqs = ["ACGTACGGT", "TTGACA" * 7]  # the second is longer than any training sequence: read in pieces
    probs, cropped = predict_sequences(loaded, seqs, batch_size=1)
    with torch.no_grad():
        expected = torch.softmax(fresh.eval()(*batch_of(seqs)), -1).numpy()
    assert cropped == 0 and np.allclose(probs, expected, atol=1e-5)
    report = TASK.eval_report(loaded, "val", three_classes / "data", rc_tta="mean")
    assert report["classes"] == loaded.meta["classes"] and report["n"] == 9
    assert set(report["per_class"]) == {"enhancer", "promoter", "zz_other"}
    assert report["majority_class"] == {"class": "enhancer", "accuracy": 1 / 3, "mcc": 0.0, "f1_macro": 1 / 6}
    with pytest.raises(UsageError, match="--opt colour: unknown for dna"):
        TASK.eval_report(loaded, "val", three_classes / "data", colour="red")


def test_loss_is_finite_on_the_gue_fixture_with_rc_aug_and_cnn(tmp_path: Path) -> None:
    gue = FIX / "gue"
    prepare(DnaPrepareOptions(train=gue / "train.csv", val=gue / "dev.csv"), tmp_path / "d")
    for task_cfg in (DnaConfig(rc_aug=True), DnaConfig(model="cnn")):
        cfg = tiny_run("dna", tmp_path / "d", task_cfg)
        data = TASK.load(cfg, tmp_path / "d")
        assert data.meta["max_train_len"] == 300 and len(data.train) == 240 and data.test is None
        model = TASK.build_model(cfg, data.meta)
        batch = {k: torch.stack([data.train[i][k] for i in range(8)]) for k in ("tokens", "length", "label")}
        loss = TASK.loss(model, batch)
        assert torch.isfinite(loss) and 0.3 < loss.item() < 1.5
    with pytest.raises(DataError, match="missing; prepare the data"):
        TASK.load(cfg, tmp_path)


def test_subtract_and_split_contigs() -> None:
    segs = [("c", 0, 100)]
    assert subtract(segs, {"c": [(10, 20), (15, 30), (90, 120)]}) == [("c", 0, 10), ("c", 30, 90)]
    assert subtract(segs, {"d": [(0, 100)]}) == segs
    assert split_contigs({"a": 1000, "b": 100}, 0.1) == (
        [("a", 0, 900), ("b", 0, 90)],
        [("a", 900, 1000), ("b", 90, 100)],
    )


def test_fasta_windows_stay_inside_their_segments(tmp_path: Path) -> None:
    fa = tmp_path / "ref.fasta"
    fa.write_text(">a\n" + "A" * 50 + "C" * 50 + "\n>b\n" + "G" * 30 + "\n")
    torch.manual_seed(0)
    windows = FastaWindows(fa, [("a", 50, 100), ("b", 0, 30)], length=9, count=200, random=True)
    starts = [windows.window(0) for _ in range(300)]
    assert all((c == "a" and 50 <= s <= 90) or (c == "b" and 0 <= s <= 20) for c, s in starts)
    assert {c for c, _ in starts} == {"a", "b"}  # both segments are drawn, in proportion to their room
    assert decode(windows[0]["tokens"].tolist()) in {"C" * 10, "G" * 10}
    tiles = FastaWindows(fa, [("a", 0, 100)], length=9, count=100, random=False)
    assert len(tiles) == 10 and tiles.starts[:2] == [("a", 0), ("a", 10)]


def test_uniform_next_base_model_scores_exactly_two_bits(tmp_path: Path) -> None:
    shutil.copy(FIX / "sars_cov_2" / "nCoV-2019.reference.fasta", tmp_path / "ref.fasta")
    cfg = tiny_run("dna-lm", tmp_path, DnaLmConfig(length=64, val_windows=5))
    data = LM_TASK.load(cfg, tmp_path)
    assert len(data.val) == 5 and data.meta["val_bases"] == 29903 - round(29903 * 0.95)
    model = LM_TASK.build_model(cfg, data.meta).eval()
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    from titans_cli.engine.evaluate import evaluate_split

    out = evaluate_split(LM_TASK, model, data.val, data.meta, batch_size=2, device=torch.device("cpu"))
    assert out["bits_per_base"] == pytest.approx(2.0) and out["bases"] == 5 * 64


def test_pretrained_backbone_transfers_into_the_classifier(tmp_path: Path, three_classes: Path) -> None:
    shutil.copy(FIX / "sars_cov_2" / "nCoV-2019.reference.fasta", tmp_path / "ref.fasta")
    (tmp_path / "held_out.bed").write_text("MN908947.3\t0\t20000\n")
    lm_cfg = tiny_run("dna-lm", tmp_path, DnaLmConfig(length=32, windows_per_epoch=16, exclude_bed="held_out.bed"))
    result = train.run(lm_cfg, LM_TASK, tmp_path / "lm", overwrite=True, quiet=True)
    assert math.isfinite(result["val"]["bits_per_base"])
    data = TASK.load(tiny_run("dna", three_classes / "data", DnaConfig()), three_classes / "data")
    model = TASK.build_model(tiny_run("dna", three_classes / "data", DnaConfig()), data.meta)
    loaded, skipped = transfer_weights(model, tmp_path / "lm")
    assert skipped == [] and "embed.weight" in loaded and any(n.startswith("backbone.") for n in loaded)
    lm = load_run(tmp_path / "lm", get_task=get_task).model
    for name, tensor in lm.state_dict().items():
        if name.startswith(("backbone.", "embed.")):
            assert torch.equal(model.state_dict()[name], tensor), name
