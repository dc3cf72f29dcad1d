"""A language model of real size pruned end to end on the host: the time and peak memory of each stage.

Each configuration runs in its own fresh subprocess:

* ``tinyllama``: TinyLlama-1.1B's sizes (22 layers, hidden 2048, 32 query / 4 key-value heads, MLP 5632,
  vocabulary 32000) in float32, 4.4 GB of weights;
* ``llama7b``: Llama-2-7B's sizes (32 layers, hidden 4096, 32 heads, MLP 11008, vocabulary 32000) in bfloat16,
  13.5 GB of weights.

The weights are random (nothing can be downloaded here) but real: every tensor is in memory, so every
stage reads and writes what it would on a trained model. The stages:

1. ``build``: the model, its weights drawn in place;
2. ``make()``: ``Mask(model, ids, algorithm=ByKind(channels=Activation(calib), block=BlockImportance(calib)),
   target_params=0.75, depth=True).make()`` on example input ids of shape (1, 16);
3. ``do_mask()``: both criteria's calibration passes over ``--calib`` sequences (one a batch), then the choice of
   heads, MLP neurons, hidden channels and whole decoder layers that keeps 75% of the parameters;
4. ``export``: ``generate_pruned_model(inplace=True)``, verified on the example input against the masked model's
   outputs (the tolerance follows the dtype).

Memory is the process's resident set, sampled every 2 ms by a thread (the peak of each stage), and its
``ru_maxrss`` at the end; the ratios divide by the bytes of the model's parameters and buffers.

Usage:
    .venv/bin/python benchmarks/llm_scale.py --output benchmarks/results/llm_scale.md          # both configs
    .venv/bin/python benchmarks/llm_scale.py --configs tinyllama --layers 2                    # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import transformers
from maskprune.algorithms import Activation, BlockImportance, ByKind
from torch import nn
from trace_scale import rss_bytes  # benchmarks/, beside this script

import maskprune
from maskprune import Mask


@dataclass(frozen=True)
class Config:
    """A Llama's sizes, its dtype and its calibration."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    dtype: str
    calib_sequences: int
    calib_length: int
    rtol: float | None = None  # the export's verification tolerance (None: the dtype's default)
    vocabulary: int = 32000


CONFIGS = {
    "tinyllama": Config(22, 2048, 32, 4, 5632, "float32", calib_sequences=8, calib_length=128),
    "llama7b": Config(32, 4096, 32, 32, 11008, "bfloat16", calib_sequences=4, calib_length=32, rtol=0.1),
}
TARGET_PARAMS = 0.75
EXAMPLE_LENGTH = 16


class PeakSampler:
    """The resident set's peak while a block runs, sampled every ``interval`` seconds by a thread.

    Examples:
        >>> with PeakSampler() as sampler:
        ...     block = bytearray(64 << 20)
        >>> sampler.peak >= 64 << 20
        True
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class Verdicts(logging.Handler):
    """Keeps the export's verification verdict from maskprune's log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.verdict = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "verified against the masked model" in message:
            self.verdict = message.split(": ", 2)[-1]


def llama(config: Config, layers: int | None) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``config``'s sizes with random weights, built without a float32 detour."""
    hf = transformers.LlamaConfig(
        vocab_size=config.vocabulary,
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=layers or config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=2048,
    )
    dtype = getattr(torch, config.dtype)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf)
    model = model.to(dtype).to_empty(device="cpu")  # the dtype first: no float32 copy of a 13 GB model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
        model.model.rotary_emb.__init__(hf)  # its inverse frequencies were left empty on the meta device
    return model.eval()


def child(name: str, layers: int | None) -> None:
    """Run the stages of one configuration and print one JSON line per stage."""
    config = CONFIGS[name]
    torch.manual_seed(0)
    stages: list[dict[str, Any]] = []

    def stage(label: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        with PeakSampler() as sampler:
            out = fn()
        stages.append({"stage": label, "seconds": time.perf_counter() - start, "peak": sampler.peak})
        print(json.dumps({"config": name, **stages[-1]}), flush=True)
        return out

    baseline = rss_bytes()
    model = stage("build", lambda: llama(config, layers))
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    dense = maskprune.count_parameters(model)
    ids = torch.randint(config.vocabulary, (1, EXAMPLE_LENGTH), generator=torch.Generator().manual_seed(1))
    calib_ids = torch.randint(config.vocabulary, (config.calib_sequences, config.calib_length))
    calibration = [{"input_ids": row[None]} for row in calib_ids]
    algorithm = ByKind(channels=Activation(calibration), block=BlockImportance(calibration))
    mask = stage("make", lambda: Mask(model, ids, algorithm=algorithm, target_params=TARGET_PARAMS, depth=True).make())
    stage("do_mask", mask.do_mask)
    verdicts = Verdicts()
    logging.getLogger("maskprune").addHandler(verdicts)
    logging.getLogger("maskprune").setLevel(logging.INFO)
    pruned = stage("export", lambda: mask.generate_pruned_model(inplace=True, rtol=config.rtol))
    summary = {
        "config": name,
        "layers": layers or config.layers,
        "dtype": config.dtype,
        "parameters": dense,
        "weights_bytes": weights,
        "baseline_rss": baseline,
        "kept_params": maskprune.count_parameters(pruned) / dense,
        "kept_layers": pruned.config.num_hidden_layers,
        "verification": verdicts.verdict,
        "rtol": config.rtol,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "stages": stages,
    }
    print(json.dumps({"summary": summary}), flush=True)


def run(name: str, layers: int | None, timeout: float) -> dict[str, Any]:
    """One configuration in a fresh subprocess; its summary (or what failed)."""
    command = [sys.executable, __file__, "--child", name] + (["--layers", str(layers)] if layers else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith('{"summary"'):
            return json.loads(line)["summary"]
    raise RuntimeError(f"{name} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


GIB = 1 << 30


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table: one row per stage, peak memory as GiB and as a multiple of the weights."""
    rows = [
        "| config | parameters (dtype) | stage | seconds | peak RSS (GiB) | peak / weights |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        label = f"{r['config']} ({r['layers']} layers)"
        size = f"{r['parameters'] / 1e9:.2f} B ({r['dtype']}, {r['weights_bytes'] / GIB:.1f} GiB)"
        for s in r["stages"]:
            rows.append(
                f"| {label} | {size} | {s['stage']} | {s['seconds']:.1f} | {s['peak'] / GIB:.2f} | "
                f"{s['peak'] / r['weights_bytes']:.2f} |"
            )
        total = sum(s["seconds"] for s in r["stages"] if s["stage"] != "build")
        rows.append(
            f"| {label} | {size} | **make to verified export** | **{total:.1f}** | "
            f"**{r['ru_maxrss'] / GIB:.2f}** | **{r['ru_maxrss'] / r['weights_bytes']:.2f}** |"
        )
    notes = [
        f"- {r['config']}: {r['kept_params']:.3f} of the parameters and {r['kept_layers']} of {r['layers']} layers "
        f"kept; calibration {r['calibration']}; verification (rtol {r['rtol'] or 'by dtype'}): {r['verification']}"
        for r in results
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(notes)


def header(argv: list[str]) -> str:
    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, maskprune {metadata.version('maskprune')}"
    )
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory = next(line.split()[1] for line in meminfo if line.startswith("MemTotal"))
    return (
        f"Command: `python benchmarks/llm_scale.py {' '.join(argv)}`  \n"
        f"Date: {date}; {versions}; CPU: {cpu}, {torch.get_num_threads()} threads, "
        f"{int(memory) / (1 << 20):.0f} GiB RAM, load average {os.getloadavg()[1]:.1f} over the last 5 minutes  \n"
        "Pruning: `ByKind(channels=Activation(calib), block=BlockImportance(calib))`, "
        f"`target_params={TARGET_PARAMS}`, `depth=True`; calibration: one sequence a batch; "
        f"export `generate_pruned_model(inplace=True)` verified on input ids (1, {EXAMPLE_LENGTH})  \n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["tinyllama", "llama7b"])
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the configuration has")
    parser.add_argument("--output", type=Path, help="write the table here (and its JSON beside it)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.layers)
        return 0
    results = []
    for name in args.configs:
        results.append(run(name, args.layers, args.timeout))
        c = CONFIGS[name]
        results[-1]["calibration"] = f"{c.calib_sequences} sequences of {c.calib_length} tokens"
        print(table(results[-1:]), flush=True)
    text = header(sys.argv[1:] if argv is None else argv) + "\n" + table(results) + "\n"
    if args.output:
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
