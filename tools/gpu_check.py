"""Device check: GPU names and weights, bf16 against fp32, OOM recovery, and embedding throughput of full-size models.

One run on a machine with a GPU answers what this project cannot test on a
CPU: the name torch reports and the weight it finds, which precision the
backends default to, how far bf16 features stray from fp32 ones and how
often the classifier's label changes with them, whether a real CUDA
out-of-memory error is survived by halving the batch, and how many
sequences per second DNABERT-S- and ESM-2-3B-sized networks (random
weights, saved and loaded in the real formats through the real backends)
embed on this GPU.

The label agreement is the fraction of frames of a generated sample whose
label (virus or others) is the same from bf16 and from fp32 features, both
computed on this device. The networks have random weights, so it measures
how sensitive labels are to the rounding, not the published models'
accuracy; `--classifier 500_model.pth` uses the published classifier (its
3,328 inputs fit the full-size networks); the random one has its boundary
moved to the median frame, so that half the sample is called virus.

    python tools/gpu_check.py --device cuda:0 --json gpu_check.json
    python tools/gpu_check.py --device cpu --small          # a smoke test of this script
"""

from __future__ import annotations

import io
import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import torch

from virnucpro.backends.common import has_native_bf16, resolve_device, resolve_precision
from virnucpro.backends.dnabert import DnabertBackend
from virnucpro.backends.esm import EsmBackend
from virnucpro.backends.tiny import (
    ESM_FILE,
    ESM_REGRESSION_FILE,
    build_tiny_tokenizer,
    esm_checkpoint_bytes,
    write_dnabert_directory,
)
from virnucpro.pipeline.classifier import MLPClassifier, load_classifier, predict_scores
from virnucpro.pipeline.features import load_features
from virnucpro.pipeline.gpu_weights import load_weight_table

# (layers, width, heads): DNABERT-S is a BERT-base; ESM-2 3B is esm2_t36_3B_UR50D.
FULL = {"dnabert": (12, 768, 12), "esm": (36, 2560, 40)}
SMALL = {"dnabert": (2, 768, 4), "esm": (4, 320, 4)}
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def device_report(device: torch.device) -> dict[str, Any]:
    report: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = load_weight_table()
        report.update(
            name=name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30,
            table_model=table.match(name), weight=table.lookup(name),
        )
    report["native_bf16"] = has_native_bf16(device)
    report["default_precision"] = resolve_precision(device)
    return report


def write_inputs(directory: Path, count: int, seed: int = 3) -> tuple[Path, Path]:
    """Paired files like the pipeline's: proteins of 20-82 aa (mean about 51) and their 3p+1-base slices."""
    rng = random.Random(seed)
    nucleotide, protein = directory / "output_1.fa", directory / "protein_1.fa"
    with open(nucleotide, "w") as nuc, open(protein, "w") as prot:
        for i in range(count):
            length = rng.randint(20, 82)
            prot.write(f">r{i}\n{''.join(rng.choice(AMINO_ACIDS) for _ in range(length))}\n")
            nuc.write(f">r{i}\n{''.join(rng.choice('ACGT') for _ in range(3 * length + 1))}\n")
    return nucleotide, protein


def write_models(directory: Path, sizes: dict[str, tuple[int, int, int]]) -> tuple[Path, Path]:
    """A DNABERT-S-shaped transformers directory and an ESM-2 checkpoint of the given sizes, random weights."""
    from esm.data import Alphabet
    from esm.model.esm2 import ESM2
    from transformers import BertConfig, BertModel

    layers, width, heads = sizes["dnabert"]
    config = BertConfig(vocab_size=build_tiny_tokenizer().get_vocab_size(), hidden_size=width,
                        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * width,
                        max_position_embeddings=1024)
    dnabert_dir = directory / "dnabert"
    dnabert_dir.mkdir()
    write_dnabert_directory(dnabert_dir, BertModel(config).eval())
    layers, width, heads = sizes["esm"]
    # Half precision on disk halves the 3B checkpoint; fair-esm loads it into fp32 parameters.
    esm = ESM2(num_layers=layers, embed_dim=width, attention_heads=heads,
               alphabet=Alphabet.from_architecture("ESM-1b"), token_dropout=True).half()
    checkpoint, regression = esm_checkpoint_bytes(esm)
    del esm
    (directory / ESM_REGRESSION_FILE).write_bytes(regression)
    esm_path = directory / ESM_FILE
    esm_path.write_bytes(checkpoint)
    return dnabert_dir, esm_path


class OomCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "out of GPU memory" in record.getMessage():
            self.count += 1


def timed_run(backend: Any, source: Path, output: Path, device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    sequences, residues = backend.run(source, output)
    seconds = time.perf_counter() - started
    figures = {"sequences": sequences, "residues": residues, "seconds": seconds,
               "sequences_per_s": sequences / seconds, "residues_per_s": residues / seconds}
    if device.type == "cuda":
        figures["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return figures


def features(path: Path) -> torch.Tensor:
    return load_features(path).data


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest cosine similarity between matching rows."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1).min())


def labels(classifier: MLPClassifier, dna: torch.Tensor, protein: torch.Tensor) -> torch.Tensor:
    """The predicted label of each frame (1 = virus), as the pipeline decides it: P(virus) > P(others)."""
    scores = predict_scores(classifier, torch.cat((dna, protein), dim=1))
    return scores[:, 1] > scores[:, 0]


def precision_agreement(backends: dict[str, Any], sources: dict[str, Path], root: Path,
                        classifier_path: Path | None) -> dict[str, Any]:
    """bf16 against fp32 on the same device and the same sample: feature cosines and label agreement."""
    found: dict[str, dict[str, torch.Tensor]] = {"bf16": {}, "fp32": {}}
    for stage, backend in backends.items():
        default = backend.precision
        for precision in found:
            backend.precision = precision
            backend.run(sources[stage], root / f"{stage}-{precision}.pt")
            found[precision][stage] = features(root / f"{stage}-{precision}.pt")
        backend.precision = default
    width = sum(found["fp32"][stage].shape[1] for stage in backends)
    if classifier_path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1997)
            classifier = MLPClassifier(width).eval()
        # Random weights call nearly every frame one class, which agrees trivially: move the boundary to the
        # median of the fp32 frames, so half are called virus and the agreement measures the rounding.
        with torch.inference_mode():
            logits = classifier(torch.cat((found["fp32"]["dnabert"], found["fp32"]["esm"]), dim=1))
            classifier.output_layer.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
        described = f"random MLPClassifier({width}), seed 1997, boundary at the fp32 median"
    else:
        classifier, described = load_classifier(classifier_path), str(classifier_path)
    bf16, fp32 = (labels(classifier, found[p]["dnabert"], found[p]["esm"]) for p in ("bf16", "fp32"))
    return {"sequences": len(fp32), "classifier": described,
            "min_cosine": {stage: agreement(found["bf16"][stage], found["fp32"][stage]) for stage in backends},
            "label_agreement": float((bf16 == fp32).float().mean()),
            "virus_fraction": {"bf16": float(bf16.float().mean()), "fp32": float(fp32.float().mean())}}


def run(device_name: str, small: bool, sequences: int, agreement_sequences: int,
        classifier: Path | None) -> dict[str, Any]:
    device = resolve_device(device_name)
    results: dict[str, Any] = {"device": device_report(device)}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        dnabert_dir, esm_path = write_models(root, SMALL if small else FULL)
        nucleotide, protein = write_inputs(root, sequences)
        (root / "warmup").mkdir()
        warmup_nuc, warmup_prot = write_inputs(root / "warmup", 64)
        (root / "sample").mkdir()
        sample_nuc, sample_prot = write_inputs(root / "sample", agreement_sequences, seed=5)
        results["setup_seconds"] = time.perf_counter() - started
        backends: dict[str, Any] = {}
        for stage, backend_class, model, source, warmup in (
            ("dnabert", DnabertBackend, dnabert_dir, nucleotide, warmup_nuc),
            ("esm", EsmBackend, esm_path, protein, warmup_prot),
        ):
            started = time.perf_counter()
            backend = backend_class(model, device=str(device))
            load_seconds = time.perf_counter() - started
            backend.run(warmup, root / f"{stage}-warmup.pt")
            figures = timed_run(backend, source, root / f"{stage}.pt", device)
            figures["load_seconds"] = load_seconds
            figures["precision"] = backend.precision
            results[stage] = figures
            backends[stage] = backend
        results["bf16_vs_fp32"] = precision_agreement(
            backends, {"dnabert": sample_nuc, "esm": sample_prot}, root, classifier)
        backends.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            results["oom_recovery"] = oom_recovery(esm_path, protein, root, device)
    return results


def oom_recovery(esm_path: Path, source: Path, root: Path, device: torch.device) -> dict[str, Any]:
    """Cap this process's GPU memory, ask for one huge batch, and check the file still completes, unchanged."""
    reference = EsmBackend(esm_path, device=str(device))
    reference.run(source, root / "oom-reference.pt")
    weights_gib = torch.cuda.memory_allocated(device) / 2**30
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, (weights_gib + 2.0) / total_gib), device)
    counter = OomCounter()
    logging.getLogger("virnucpro.backends.common").addHandler(counter)
    try:
        reference.token_budget = 10**7
        figures = timed_run(reference, source, root / "oom.pt", device)
    finally:
        logging.getLogger("virnucpro.backends.common").removeHandler(counter)
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return {"memory_cap_gib": weights_gib + 2.0, "halvings": counter.count, "seconds": figures["seconds"],
            "min_cosine_vs_uncapped": agreement(features(root / "oom.pt"), features(root / "oom-reference.pt"))}


@click.command()
@click.option("--device", default="cuda:0", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--small", is_flag=True, help="Small networks instead of full-size ones (a smoke test).")
@click.option("--sequences", default=10000, show_default=True, help="Sequences per timed file (one pipeline file).")
@click.option("--agreement-sequences", default=2000, show_default=True,
              help="Frames of the sample embedded in bf16 and in fp32 to compare their labels.")
@click.option("--classifier", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Classifier checkpoint for the label agreement [default: a random one of the right width].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(device: str, small: bool, sequences: int, agreement_sequences: int, classifier: Path | None,
         json_path: Path | None) -> None:
    """Check and time everything GPU-specific; print the figures (and write them as JSON)."""
    logging.basicConfig(level=logging.WARNING)
    results = run(device, small, sequences, agreement_sequences, classifier)
    out = io.StringIO()
    json.dump(results, out, indent=2)
    click.echo(out.getvalue())
    if json_path:
        json_path.write_text(out.getvalue() + "\n")


if __name__ == "__main__":
    main()
