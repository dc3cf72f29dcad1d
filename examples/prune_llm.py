"""Remove a quarter of a small Llama's parameters by width, by depth and by both, with each criterion.

Offline, on two CPU cores:

1. the corpus: the reST sources of Python's documentation (Debian's ``python3-doc``), split into a
   training and a held-out part by file; the tokenizer is bytes (vocabulary 256);
2. a small Llama-architecture model (grouped-query attention, RMSNorm, SwiGLU) trained on it, or read
   from ``.cache/llm/``;
3. for each criterion and each way of pruning (``width``: channels, heads and the hidden size;
   ``depth``: whole decoder layers; ``both``), ``Mask(..., target_params=0.75)`` keeps 75% of the
   parameters; the export is verified against the masked model;
4. held-out perplexity as pruned and after a short fine-tune, as a markdown table and JSON; the first row
   (``none``) is the control: the dense model fine-tuned the same steps.

Example:
    bash scripts/llm.sh                                       # installs python3-doc, then runs this
    python examples/prune_llm.py --finetune-steps 100 --criteria l2norm taylor --modes width
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from maskprune.algorithms import FLAP, Activation, BlockImportance, ByKind, L2Norm, Random, Taylor, WandaSP
from maskprune.algorithms.flap import add_zero_biases
from torch import nn

import maskprune
from maskprune import Algorithm, Mask

ROOT = Path(__file__).resolve().parents[1]
#: Where Debian's python3-doc puts the reST sources of the documentation.
CORPUS_DIR = Path("/usr/share/doc/python3/html/_sources")
#: Trained base models are cached here, one file per configuration, seed and training budget.
CACHE_DIR = ROOT / ".cache" / "llm"
RESULTS = ROOT / "benchmarks" / "results" / "prune_llm"
#: One file in this many goes to the held-out split.
HELD_OUT_EVERY = 10
#: Channel criteria (``width``, and with :class:`BlockImportance` for the blocks, ``both``).
WIDTH_CRITERIA = ("l2norm", "taylor", "activation", "wandasp", "flap", "random")
#: ``none`` is the control: the dense model fine-tuned as the pruned ones are.
MODES = ("none", "width", "depth", "both")


@dataclass(frozen=True)
class ModelSize:
    """The Llama configuration: a byte vocabulary, grouped-query attention (``heads`` over ``kv_heads``)."""

    hidden: int = 128
    layers: int = 12
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 384
    context: int = 128

    def config(self) -> transformers.LlamaConfig:
        return transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.context,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )


@dataclass(frozen=True)
class Budget:
    """Training and evaluation sizes: the base model's steps, each fine-tune's, batches and held-out windows."""

    train_steps: int = 600
    finetune_steps: int = 50
    batch: int = 16
    lr: float = 2e-3
    finetune_lr: float = 5e-4
    eval_windows: int = 128
    calib_sequences: int = 8
    seed: int = 0


@dataclass
class Corpus:
    """The corpus as bytes: the training and the held-out split, and the files of each."""

    train: torch.Tensor
    held_out: torch.Tensor
    train_files: int
    held_out_files: int


def load_corpus(directory: Path = CORPUS_DIR) -> Corpus:
    """Every ``*.txt`` under ``directory``, sorted; one file in :data:`HELD_OUT_EVERY` is held out."""
    files = sorted(Path(directory).rglob("*.txt"))
    if not files:
        raise FileNotFoundError(
            f"no .txt files under {directory}: install Debian's python3-doc (bash scripts/llm.sh does) or give --corpus"
        )
    train, held_out = [], []
    for i, path in enumerate(files):
        (held_out if i % HELD_OUT_EVERY == 0 else train).append(path.read_bytes())
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(held_out), len(train), len(held_out))


def windows(data: torch.Tensor, length: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``length`` tokens, shape ``(count, length)``."""
    starts = torch.randint(0, len(data) - length, (count,), generator=generator)
    return torch.stack([data[s : s + length] for s in starts.tolist()])


def batches(data: torch.Tensor, size: ModelSize, budget: Budget, seed: int) -> Iterator[torch.Tensor]:
    """Endless training batches of ``context + 1`` tokens (inputs and next-token targets)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield windows(data, size.context + 1, budget.batch, generator)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``tokens`` (``(batch, length)``)."""
    logits = model(input_ids=tokens[:, :-1]).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def train(model: nn.Module, data: torch.Tensor, size: ModelSize, budget: Budget, steps: int, lr: float) -> float:
    """AdamW with a short warm-up and a cosine decay for ``steps`` steps; returns the seconds taken."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    start = time.perf_counter()
    for step, tokens in enumerate(itertools.islice(batches(data, size, budget, seed=budget.seed + steps), steps)):
        loss = lm_loss(model, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:5d}/{steps}  loss {loss.item():.3f}", flush=True)
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor, size: ModelSize, budget: Budget) -> float:
    """Per-byte perplexity on the first ``eval_windows`` consecutive windows of ``data``."""
    length = size.context + 1
    count = min(budget.eval_windows, (len(data) - 1) // size.context)
    tokens = torch.stack([data[i * size.context : i * size.context + length] for i in range(count)])
    was_training = model.training
    model.eval()
    losses = [lm_loss(model, chunk) for chunk in tokens.split(16)]
    model.train(was_training)
    sizes = [len(chunk) for chunk in tokens.split(16)]
    return math.exp(sum(loss.item() * n for loss, n in zip(losses, sizes, strict=True)) / sum(sizes))


def base_model(corpus: Corpus, size: ModelSize, budget: Budget, cache_dir: Path | None = CACHE_DIR) -> nn.Module:
    """The trained base model: read from ``cache_dir`` when this configuration was trained before."""
    torch.manual_seed(budget.seed)
    model = transformers.LlamaForCausalLM(size.config())
    key = "-".join(f"{k}{v}" for k, v in asdict(size).items())
    path = None if cache_dir is None else Path(cache_dir) / f"llama-{key}-s{budget.train_steps}-seed{budget.seed}.pt"
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"base model read from {path}")
        return model.eval()
    print(f"training the base model: {maskprune.count_parameters(model):,} parameters, {budget.train_steps} steps")
    seconds = train(model, corpus.train, size, budget, budget.train_steps, budget.lr)
    print(f"  trained in {seconds:.0f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def channel_criterion(name: str, calibration: list[dict]) -> Algorithm:
    """The width criterion called ``name`` (see :data:`WIDTH_CRITERIA`)."""
    return {
        "l2norm": lambda: L2Norm(),
        "taylor": lambda: Taylor(),
        "activation": lambda: Activation(calibration),
        "wandasp": lambda: WandaSP(calibration),
        "flap": lambda: FLAP(calibration),
        "random": lambda: Random(seed=0),
    }[name]()


def algorithm_for(name: str, mode: str, calibration: list[dict]) -> Algorithm:
    """``width``: the channel criterion; ``depth``: block importance (or random blocks); ``both``: the two."""
    if mode == "width":
        return channel_criterion(name, calibration)
    blocks = Random(seed=0) if name == "random" else BlockImportance(calibration)
    if mode == "depth":
        return ByKind(block=blocks)
    return Random(seed=0) if name == "random" else ByKind(channels=channel_criterion(name, calibration), block=blocks)


def grid(criteria: Sequence[str], modes: Sequence[str]) -> list[tuple[str, str]]:
    """The (mode, criterion) pairs to run; depth-only runs once per block criterion (blockimportance, random)."""
    runs = []
    for mode in modes:
        if mode == "none":
            runs.append((mode, "dense"))
        elif mode == "depth":
            runs += [(mode, "blockimportance")] + ([(mode, "random")] if "random" in criteria else [])
        else:
            runs += [(mode, name) for name in criteria]
    return runs


@dataclass
class Run:
    """One row of the table."""

    mode: str
    criterion: str
    kept_params: float
    layers: int
    ppl_pruned: float
    ppl_finetuned: float
    seconds: float
    verified: bool = field(default=False)


def calibration_batches(corpus: Corpus, size: ModelSize, budget: Budget) -> list[dict[str, torch.Tensor]]:
    """``calib_sequences`` random windows of the training split, in batches of 4 (the same at every call)."""
    generator = torch.Generator().manual_seed(budget.seed + 1)
    tokens = windows(corpus.train, size.context, budget.calib_sequences, generator)
    return [{"input_ids": chunk} for chunk in tokens.split(4)]


def pruned_copy(base: nn.Module, mode: str, name: str, calibration: list[dict], target: float = 0.75) -> nn.Module:
    """A copy of ``base`` with ``target`` of its parameters, exported (and verified) from a Mask."""
    model = copy.deepcopy(base).eval()
    if mode == "none":  # the control: no pruning
        return model
    if name == "flap":
        add_zero_biases(model, ["o_proj", "down_proj"])  # FLAP compensates the removed channels in biases
    algorithm = algorithm_for(name, mode, calibration)
    mask = Mask(model, calibration[0], algorithm=algorithm, target_params=target, depth=mode != "width").make()
    if name == "taylor":  # gradients on the calibration batches
        model.zero_grad(set_to_none=True)
        for batch in calibration:
            lm_loss(model, batch["input_ids"]).backward()
        model.zero_grad(set_to_none=True)
    mask.do_mask()
    pruned = mask.generate_pruned_model()  # verified: raises ExportError when it differs from the masked model
    mask.remove()  # the masked copy is done with; the export is a plain model
    return pruned


def prune_one(
    base: nn.Module, mode: str, name: str, corpus: Corpus, size: ModelSize, budget: Budget, target: float = 0.75
) -> Run:
    """Prune a copy of ``base`` to ``target`` of its parameters, export (verified), measure, fine-tune, measure.

    ``mode="none"`` is the control: the dense model, fine-tuned the same steps.
    """
    start = time.perf_counter()
    calibration = calibration_batches(corpus, size, budget)
    criterion = "blockimportance" if mode == "depth" and name != "random" else name
    pruned = pruned_copy(base, mode, name, calibration, target)
    kept = maskprune.count_parameters(pruned) / maskprune.count_parameters(base)
    ppl_pruned = perplexity(pruned, corpus.held_out, size, budget)
    train(pruned, corpus.train, size, budget, budget.finetune_steps, budget.finetune_lr)
    ppl_finetuned = perplexity(pruned, corpus.held_out, size, budget)
    return Run(
        mode=mode,
        criterion=criterion if mode != "both" or name == "random" else f"{name}+blockimportance",
        kept_params=kept,
        layers=pruned.config.num_hidden_layers,
        ppl_pruned=ppl_pruned,
        ppl_finetuned=ppl_finetuned,
        seconds=time.perf_counter() - start,
        verified=mode != "none",
    )


def cpu_model() -> str:
    """``lscpu``'s model name, or ``platform.processor()``."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown"
    )


def markdown(runs: list[Run], dense: float, base_info: dict) -> str:
    """The results as a markdown table, preceded by how they were made."""
    lines = [
        f"Command: `{base_info['command']}`  ",
        f"Date: {base_info['date']}; torch {base_info['torch']}, transformers {base_info['transformers']}; "
        f"CPU: {base_info['cpu']}, {base_info['threads']} thread(s)  ",
        f"Model: {base_info['model']}  ",
        f"Corpus: {base_info['corpus']}  ",
        f"Dense held-out perplexity (per byte): **{dense:.3f}**",
        "",
        "| pruned by | criterion | kept params | layers | ppl pruned | ppl after fine-tune | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r.mode} | {r.criterion} | {r.kept_params:.3f} | {r.layers} | {r.ppl_pruned:.3f} | "
            f"{r.ppl_finetuned:.3f} | {r.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR, help="directory of .txt files (recursive)")
    parser.add_argument("--criteria", nargs="+", default=list(WIDTH_CRITERIA), choices=WIDTH_CRITERIA)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--train-steps", type=int, default=Budget.train_steps)
    parser.add_argument("--finetune-steps", type=int, default=Budget.finetune_steps)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="writes OUT.md and OUT.json")
    parser.add_argument("--no-cache", action="store_true", help="train the base model even if cached")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    size, budget = ModelSize(), Budget(train_steps=args.train_steps, finetune_steps=args.finetune_steps)
    corpus = load_corpus(args.corpus)
    print(
        f"corpus: {corpus.train_files} training files ({len(corpus.train):,} bytes), "
        f"{corpus.held_out_files} held out ({len(corpus.held_out):,} bytes)"
    )
    base = base_model(corpus, size, budget, cache_dir=None if args.no_cache else CACHE_DIR)
    dense = perplexity(base, corpus.held_out, size, budget)
    print(f"dense held-out perplexity {dense:.3f}")
    info = {
        "command": "python examples/prune_llm.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_model(),
        "threads": args.threads,
        "model": f"Llama, {maskprune.count_parameters(base):,} parameters, {asdict(size)}, "
        f"{budget.train_steps} steps of {budget.batch} x {size.context} bytes",
        "corpus": f"{args.corpus}: {corpus.train_files} files ({len(corpus.train):,} bytes) for training, "
        f"{corpus.held_out_files} ({len(corpus.held_out):,} bytes) held out; "
        f"perplexity over {budget.eval_windows} windows of {size.context} bytes; "
        f"calibration: {budget.calib_sequences} sequences of {size.context} bytes; "
        f"fine-tune: {budget.finetune_steps} steps",
    }
    runs: list[Run] = []
    for mode, name in grid(args.criteria, args.modes):
        print(f"{mode} / {name}", flush=True)
        run = prune_one(base, mode, name, corpus, size, budget)
        print(f"  kept {run.kept_params:.3f}, ppl {run.ppl_pruned:.3f} -> {run.ppl_finetuned:.3f}", flush=True)
        runs.append(run)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(markdown(runs, dense, info))
        args.out.with_suffix(".json").write_text(
            json.dumps({**info, "dense_ppl": dense, "runs": [asdict(r) for r in runs]}, indent=1) + "\n"
        )
    print(markdown(runs, dense, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
