"""Sweep timm's model list under a time budget: trace, prune half, export and verify each model; report the pass rate.

Order: round-robin over timm's model modules (``timm.list_modules()``, e.g. ``resnet``, ``vision_transformer``)
in a seeded random order, a seeded random model of each module per round. A budget of minutes covers a
tenth of timm's ~1,400 names, many of which are one architecture at several sizes or resolutions; the
round-robin tries every architecture family before it tries any family twice, and the seed makes a run
repeatable.

Each model runs in a worker process (restarted after a timeout, a crash, or ``--restart-every`` models),
with a per-model limit (``--limit-s``) and a total budget (``--budget-min``: no model starts after it):

1. build on the meta device to count parameters (models above ``--max-params`` millions are skipped unless
   ``--include-huge``); build for real (``pretrained=False``), eval mode, seed 0;
2. a forward pass at the smallest resolution the model accepts of 64, 96 and its ``pretrained_cfg``
   ``input_size`` (batch 1);
3. ``Mask(model, x, algorithm=L1Norm(), ratio=0.5).make()``, ``do_mask()``, ``generate_pruned_model()``
   (which verifies soft == hard and raises otherwise), and the parameter ratio.

Outcomes: ``pass`` (exported, verified, fewer parameters), ``nothing-pruned`` (exported with as many parameters,
or ``make()`` found no prunable channel), ``build/skip`` (timm cannot build or run the model at any of those
sizes; not maskprune's failure), ``skip-huge``, ``fail-trace`` (``make()`` raised), ``fail-mask``
(``do_mask()`` raised), ``fail-export/verify`` (``generate_pruned_model()`` raised), ``timeout`` (in one of
maskprune's steps; a timeout while timm builds or runs the model counts as ``build/skip``).

With ``--audit-trial-export`` every make() runs its trial export, and each model records whether make()
would have skipped it (``maskprune._probe.needs_trial_export``) and whether it would then have missed a
channel count the model's code fixes: a check of the skip over many architectures.

Usage:
    nice -n 10 .venv/bin/python benchmarks/timm_sweep.py --budget-min 20
    nice -n 10 .venv/bin/python benchmarks/timm_sweep.py --budget-min 15 --audit-trial-export --output /tmp/audit.json
    .venv/bin/python benchmarks/timm_sweep.py --models resnet18 vit_tiny_patch16_224 --limit-s 120
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import multiprocessing as mp
import platform
import random
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
RATIO = 0.5
SIZES = (64, 96)
STARTUP_S = 300  # seconds a fresh worker may take to import torch, timm and maskprune
MASKPRUNE_STAGES = ("make", "do_mask", "export")
FAILURES = {"make": "fail-trace", "do_mask": "fail-mask", "export": "fail-export/verify"}
OUTCOMES = ("pass", "nothing-pruned", "fail-trace", "fail-mask", "fail-export/verify", "timeout", "build/skip",
            "skip-huge")  # fmt: skip
COUNTED = ("pass", "nothing-pruned", "fail-trace", "fail-mask", "fail-export/verify", "timeout")


@dataclass
class Row:
    """One model's outcome."""

    model: str
    outcome: str
    stage: str = ""  # the step that failed or timed out
    error: str = ""  # its first line
    input_size: str = ""
    params_before: int | None = None
    params_after: int | None = None
    groups: int | None = None
    seconds: float = 0.0
    trial_export: str = ""  # with --audit-trial-export: "needed", "skipped", or "MISSED: <what it would freeze>"


TRIAL: dict[str, Any] = {}  # the current model's trial export, under --audit-trial-export


def audit_trial_export() -> None:
    """Make every make() run its trial export, noting in TRIAL whether make() would skip it and what it froze."""
    import maskprune.mask as mask_module

    needs, fixed_size_groups = mask_module.needs_trial_export, mask_module.fixed_size_groups

    def always(*args: Any) -> bool:
        TRIAL["skippable"] = not needs(*args)
        return True

    def recorded(*args: Any, **kwargs: Any) -> Any:
        fixed, note = fixed_size_groups(*args, **kwargs)
        TRIAL["froze"] = next(iter(fixed.values()), None)
        return fixed, note

    mask_module.needs_trial_export, mask_module.fixed_size_groups = always, recorded


def trial_verdict() -> str:
    """The current model's audit result (empty when make() did not get as far as the trial export)."""
    if "skippable" not in TRIAL:
        return ""
    if not TRIAL["skippable"]:
        return "needed"
    return f"MISSED: {TRIAL['froze']}" if TRIAL.get("froze") else "skipped"


def sweep_order(models: Sequence[str], module_of: dict[str, str], seed: int) -> list[str]:
    """Round-robin over the modules in a seeded random order, a seeded random model of each per round."""
    rng = random.Random(seed)
    by_module: dict[str, list[str]] = collections.defaultdict(list)
    for name in models:
        by_module[module_of.get(name, "")].append(name)
    queues = [rng.sample(names, len(names)) for _, names in sorted(by_module.items())]
    rng.shuffle(queues)
    order = []
    while queues:
        order.extend(queue.pop() for queue in queues)
        queues = [queue for queue in queues if queue]
    return order


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def count_params(model: Any) -> int:
    """Parameters of a model, tied ones once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def meta_params(name: str) -> int | None:
    """The model's parameter count from a build on the meta device (None if timm cannot build it there)."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            return count_params(timm.create_model(name, pretrained=False))
    except Exception:
        return None


def runnable_input(model: Any) -> Any:
    """The smallest input of ``SIZES`` and the model's own size that a forward pass accepts (batch 1)."""
    import torch

    channels, *default = model.pretrained_cfg.get("input_size", (3, 224, 224))
    sizes = [(s, s) for s in SIZES if s < min(default)] + [tuple(default)]
    error: Exception | None = None
    for size in sizes:
        x = torch.randn(1, channels, *size, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception as exc:  # too small for this model: try the next size
            error = exc
    assert error is not None
    raise error


def prune(model: Any, x: Any, step: Callable[[str], None]) -> tuple[int, int]:
    """make(), do_mask(), the verified export; the number of groups and the exported model's parameters."""
    from maskprune.algorithms import L1Norm

    from maskprune import Mask

    step("make")
    mask = Mask(model, x, algorithm=L1Norm(), ratio=RATIO).make()
    step("do_mask")
    mask.do_mask()
    step("export")
    pruned = mask.generate_pruned_model()
    return len(mask.groups), count_params(pruned)


def sweep_model(name: str, max_params: float | None, conn: Connection) -> Row:
    """One model from build to verified export, classified; each step is announced on ``conn`` as it starts."""
    import timm
    import torch

    from maskprune import NothingToPruneError

    stages: list[str] = []
    TRIAL.clear()

    def step(stage: str) -> None:
        stages.append(stage)
        conn.send(("stage", stage))

    step("build")
    estimate = meta_params(name)
    if max_params is not None and estimate is not None and estimate > max_params:
        return Row(name, "skip-huge", "build", f"{estimate / 1e6:.0f}M parameters on meta", params_before=estimate)
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False).eval()
        x = runnable_input(model)
    except Exception as exc:
        return Row(name, "build/skip", "build", first_line(exc), params_before=estimate)
    row = Row(name, "pass", input_size="x".join(map(str, x.shape[1:])), params_before=count_params(model))
    try:
        row.groups, row.params_after = prune(model, x, step)
    except NothingToPruneError as exc:
        row.outcome, row.stage, row.error = "nothing-pruned", "make", first_line(exc)
    except Exception as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        row.outcome, row.stage = FAILURES[stages[-1]], stages[-1]
        row.error = f"{first_line(exc)} [{Path(frame.filename).name}:{frame.lineno}]"
    if row.outcome == "pass" and row.params_after is not None and row.params_after >= row.params_before:
        row.outcome = "nothing-pruned"
    row.trial_export = trial_verdict()
    return row


def worker(conn: Connection, max_params: float | None, threads: int, audit: bool) -> None:
    """Sweep the models the parent sends, one at a time, until it sends None; says "ready" after its imports."""
    import warnings

    import timm  # noqa: F401  (imported before "ready": a model's time limit does not pay for it)
    import torch

    import maskprune  # noqa: F401

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    if audit:
        audit_trial_export()
    conn.send(("ready", None))
    for name in iter(conn.recv, None):
        start = time.perf_counter()
        row = sweep_model(name, max_params, conn)
        row.seconds = round(time.perf_counter() - start, 2)
        conn.send(("done", asdict(row)))
        gc.collect()


class Workers:
    """One worker process at a time, replaced after a timeout, a crash or ``restart_every`` models."""

    def __init__(self, max_params: float | None, threads: int, restart_every: int, audit: bool = False) -> None:
        self.args, self.restart_every = (max_params, threads, audit), restart_every
        self.context = mp.get_context("spawn")
        self.process: Any = None
        self.served = 0

    def run(self, name: str, limit_s: float) -> Row:
        """Sweep one model; a Row of outcome timeout or crash when the worker does not answer in time."""
        if self.process is None or self.served >= self.restart_every:
            self.start()
        self.served += 1
        self.conn.send(name)
        stage, deadline, start = "build", time.monotonic() + limit_s, time.monotonic()
        while True:
            remaining = deadline - time.monotonic()
            try:
                ready = remaining > 0 and self.conn.poll(remaining)
                message = self.conn.recv() if ready else None
            except (EOFError, OSError):
                self.stop()
                return self.lost(name, stage, None, start)
            if message is None:
                self.stop()
                return self.lost(name, stage, limit_s, start)
            if message[0] == "done":
                return Row(**message[1])
            stage = message[1]

    @staticmethod
    def lost(name: str, stage: str, limit_s: float | None, start: float) -> Row:
        """The Row of a model whose worker ran past ``limit_s`` (a timeout) or died (``limit_s`` None).

        Either counts as maskprune's in one of its steps, and as build/skip while timm builds or runs the model.
        """
        if limit_s is None:
            outcome, error = FAILURES.get(stage, "build/skip"), "the worker process died (crash or out of memory)"
        else:
            outcome, error = "timeout" if stage in MASKPRUNE_STAGES else "build/skip", f"no result in {limit_s:.0f} s"
        return Row(name, outcome, stage, error, seconds=round(time.monotonic() - start, 2))

    def start(self) -> None:
        """A fresh worker process."""
        self.stop()
        self.conn, child = self.context.Pipe()
        self.process = self.context.Process(target=worker, args=(child, *self.args), daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(STARTUP_S) or self.conn.recv()[0] != "ready":
            raise RuntimeError(f"the worker process did not start in {STARTUP_S} s")
        self.served = 0

    def stop(self) -> None:
        """End the current worker, if any."""
        if self.process is None:
            return
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.process = None


def sweep(order: Sequence[str], args: argparse.Namespace) -> Iterator[Row]:
    """Rows of the models in ``order`` until the budget runs out."""
    max_params = None if args.include_huge else args.max_params * 1e6
    workers = Workers(max_params, args.threads, args.restart_every, args.audit_trial_export)
    deadline = time.monotonic() + args.budget_min * 60
    try:
        for index, name in enumerate(order):
            if time.monotonic() >= deadline:
                return
            row = workers.run(name, args.limit_s)
            print(f"[{index + 1}] {name}: {row.outcome} {row.error}"[:200], file=sys.stderr, flush=True)
            yield row
    finally:
        if workers.process is not None:
            workers.conn.send(None)
            workers.stop()


def error_key(error: str) -> str:
    """An error message with its numbers blanked, so that one failure in several models or layers counts once."""
    return re.sub(r"\d+", "N", error)


def summary(rows: Sequence[Row], total: int, order_note: str) -> str:
    """Outcome counts, the pass rate over the models timm could build and run, and the top failures."""
    counts = collections.Counter(row.outcome for row in rows)
    counted = sum(counts[o] for o in COUNTED)
    rate = f"{counts['pass'] / counted:.1%}" if counted else "-"
    lines = [
        f"{len(rows)} of {total} timm models swept ({order_note}); not reached in the budget: {total - len(rows)}",
        f"pass rate: {counts['pass']}/{counted} = {rate} (over the models timm could build and run)",
        "",
        "| outcome | models |",
        "| --- | --: |",
        *(f"| {o} | {counts[o]} |" for o in OUTCOMES),
        "",
        "| outcome | stage | error (numbers blanked) | models | examples |",
        "| --- | --- | --- | --: | --- |",
    ]
    by_error: dict[tuple[str, str, str], list[str]] = collections.defaultdict(list)
    for row in rows:
        if row.outcome not in ("pass", "skip-huge"):
            by_error[row.outcome, row.stage, error_key(row.error)].append(row.model)
    for (outcome, stage, key), models in sorted(by_error.items(), key=lambda item: -len(item[1])):
        cell = key.replace("|", "\\|")
        lines.append(f"| {outcome} | {stage} | {cell} | {len(models)} | {', '.join(models[:3])} |")
    audited = [row for row in rows if row.trial_export]
    if audited:
        skipped = [row for row in audited if row.trial_export != "needed"]
        missed = [f"{row.model} ({row.trial_export})" for row in skipped if row.trial_export.startswith("MISSED")]
        lines += [
            "",
            f"trial export audit: make() skips it on {len(skipped)} of {len(audited)} models that reached it; "
            f"it would have frozen channels in {len(missed)} of those{': ' if missed else ''}{'; '.join(missed)}",
        ]
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> str:
    """Versions and settings."""
    import torch

    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "timm", "maskprune"))
    limit = "no limit" if args.include_huge else f"at most {args.max_params:g}M parameters"
    return (
        f"{versions}, python {platform.python_version()}; torch threads per worker: {args.threads} "
        f"(of {torch.get_num_threads()})\n"
        f"L1Norm, ratio {RATIO}, inputs of {' or '.join(map(str, SIZES))} px or the model's own size, "
        f"{args.limit_s:g} s a model, budget {args.budget_min:g} min, {limit}, seed {args.seed}"
    )


def timm_models(names: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """The model names to sweep (all of timm's by default) and each one's timm module."""
    import timm

    module_of = {name: module for module in timm.list_modules() for name in timm.list_models(module=module)}
    return list(names or timm.list_models()), module_of


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-min", type=float, default=20.0, help="no model starts after this (default 20)")
    parser.add_argument("--limit-s", type=float, default=60.0, help="seconds a model may take (default 60)")
    parser.add_argument("--max-params", type=float, default=100.0,
                        help="skip models above this many million parameters (default 100)")  # fmt: skip
    parser.add_argument("--include-huge", action="store_true", help="no parameter limit")
    parser.add_argument("--models", nargs="+", help="these timm names, in this order (default: all, round-robin)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sweep order (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the worker (default 1)")
    parser.add_argument("--restart-every", type=int, default=20, help="fresh worker after N models (default 20)")
    parser.add_argument("--audit-trial-export", action="store_true",
                        help="always run make()'s trial export; report where skipping it misses a count")  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS / "timm_sweep.json",
                        help="per-model results (JSON; the summary goes to the .md next to it)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Sweep, print the summary, write the per-model JSON and the summary's markdown."""
    args = parse_args(argv)
    names, module_of = timm_models(args.models)
    order = names if args.models else sweep_order(names, module_of, args.seed)
    note = "in the order given" if args.models else f"round-robin over {len(set(module_of.values()))} modules"
    env = environment(args)
    print(env, end="\n\n", flush=True)
    started = time.monotonic()
    rows = list(sweep(order, args))
    text = f"{summary(rows, len(order), note)}\n\nswept in {(time.monotonic() - started) / 60:.1f} min"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(f"{env}\n\n{text}\n")
    print(f"written to {args.output} and {args.output.with_suffix('.md').name}", file=sys.stderr)


if __name__ == "__main__":
    main()
