"""The ``maskprune`` command line: inspect a model's groups, prune and save it, report what pruning changed.

Examples:
    maskprune inspect torchvision:resnet18 --input-shape 1,3,64,64
    maskprune prune torchvision:resnet18 --weights DEFAULT --algorithm fpgm --ratio 0.3 --out resnet18-fpgm
    maskprune prune torchvision:resnet18 --checkpoint mine.pt --ratio 0.3 --calib images.pt --out resnet18-l1
    maskprune report resnet18-fpgm --plot channels.png --threads 4
    maskprune prune hf:my-llama --calib text.txt --algorithm wandasp --target-params 0.75 --depth --out my-llama-75

Every error is one line on stderr and exit status 2 (``--debug``: the traceback instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

import maskprune.algorithms as criteria

from ._models import build_model, load_checkpoint, parse_shape, text_batches
from ._progress import progress
from ._recalibrate import DEFAULT_BATCHES
from ._spec import as_spec
from ._verify import VerifyResult, verify
from .errors import MaskpruneError
from .mask import Mask
from .serialization import OWN_FILES, load_pruned, save_pruned
from .summary import compare, layer_channels, plot_channels

log = logging.getLogger("maskprune")
DEFAULT_SHAPE = (1, 3, 224, 224)

# criteria that score from the weights alone (APoZ, ThiNet and Taylor need data or training)
ALGORITHMS = {
    "l1": criteria.L1Norm,
    "l2": criteria.L2Norm,
    "fpgm": criteria.FPGM,
    "bnscale": criteria.BNScale,
    "random": criteria.Random,
    "uniform": criteria.Uniform,
}
# criteria that read calibration batches (--calib): language models
CALIBRATED = {
    "activation": criteria.Activation,
    "wandasp": criteria.WandaSP,
    "blockimportance": criteria.BlockImportance,
}


# errors that say what was wrong in the user's terms: their message is enough
EXPECTED_ERRORS = (MaskpruneError, ValueError, OSError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status: 0, or 2 after one line on stderr saying what was wrong (130 after
    Ctrl-C)."""
    args = _parser().parse_args(argv)  # bad arguments: one line and exit status 2 (Parser.error)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    try:
        args.run(args)
    except BrokenPipeError:  # the reader went away (`maskprune inspect ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except KeyboardInterrupt:  # Ctrl-C: not an error, the shell's status for it
        if args.debug:
            raise
        print("maskprune: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(f"maskprune: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


def _one_line(error: Exception) -> str:
    """The error's message on one line; the type too, and where to see more, for an error no check foresaw."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if isinstance(error, EXPECTED_ERRORS) and message:
        return message
    return f"{type(error).__name__}: {message} (run with --debug for the traceback)"


def inspect(args: argparse.Namespace) -> None:
    """Print the groups, their sizes, what is frozen and why."""
    model = _model(args)
    mask = Mask(model, input_shape=args.input_shape).make()
    print(mask)
    if args.groups:
        for group in mask.groups:
            print(f"\n{group}")


def prune(args: argparse.Namespace) -> None:
    """One-shot (or ``--steps``) pruning, export, verification on a fresh batch, save."""
    _check_out(Path(args.out), args.force)
    calibration = _calibration(args)  # before the model: its checks cost nothing
    model = _model(args)
    mask = _pruned_mask(model, args, calibration[0] if calibration else args.input_shape, calibration)
    log.info("exporting (verified against the masked model)")
    pruned = mask.generate_pruned_model()
    check = verify(model, pruned, calibration[-1]) if calibration else _verify(mask, pruned, args.input_shape)
    log.info("soft vs hard on a fresh batch: %s", check)
    if not check:
        raise MaskpruneError(f"the exported model differs from the masked model on a fresh batch: {check}")
    inputs = {"calib": str(args.calib)} if calibration else {"input_shape": list(args.input_shape)}
    info = {"model": args.model, **_weights_info(args), **inputs, "pruning": _pruning_info(args, mask)}
    architecture = None if args.model.startswith("hf:") else args.model  # a transformers model records its config
    folder = save_pruned(pruned, args.out, info=info, architecture=architecture)
    kept, total = mask.sparsity().channels
    print(f"saved {args.model} ({kept}/{total} channels kept) to {folder}")


def report(args: argparse.Namespace) -> None:
    """Channels per group, parameters, FLOPs and latency before and after; optionally the per-layer plot."""
    target = Path(args.target)
    if target.is_dir() and _weights_info(args):
        raise ValueError(
            f"{target} is a saved folder, which holds its weights: --weights, --pretrained and "
            "--checkpoint are for a model pruned here"
        )
    name, original, mask, pruned = _saved(target, args) if target.is_dir() else _fresh(args)
    sparsity = mask.sparsity()
    if target.is_dir():
        pruning = as_spec(target).info.get("pruning")
        described = f"{_described(pruning)}, " if isinstance(pruning, dict) else ""
        sparsity = dataclasses.replace(sparsity, requested=f"{described}the spec saved in {target.name}")
    else:
        sparsity = dataclasses.replace(sparsity, requested=_described(_pruning_info(args, mask)))
    inputs = mask.example_inputs
    mask.remove()
    log.info("timing each model for %s s on %d thread(s) (torch.utils.benchmark)", args.min_time, args.threads)
    kept, total = sparsity.channels
    timing = {"threads": args.threads, "min_run_time": args.min_time}
    comparison = compare(original, pruned, inputs, channels=(total, kept), **timing)
    print(sparsity)
    print(f"\n{name}, input {tuple(inputs.shape)}:\n{comparison}")
    if args.plot:
        plot_channels(layer_channels(original, pruned), args.plot, f"{name}: {sparsity.requested}")
        print(f"plot written to {args.plot}")


def _saved(folder: Path, args: argparse.Namespace) -> tuple[str, torch.nn.Module, Mask, torch.nn.Module]:
    """A saved folder: the original rebuilt and masked by the spec, and the saved model loaded."""
    spec = as_spec(folder)
    name = args.model or spec.info.get("model")
    if not name:
        raise ValueError(f"{folder} does not record its model: give --model torchvision:NAME (or module:factory)")
    shape = args.input_shape or tuple(spec.info.get("input_shape", ())) or DEFAULT_SHAPE
    original = build_model(name)
    mask = Mask(original, input_shape=shape).make().apply_spec(spec)
    return name, original, mask, load_pruned(build_model(name), folder)


def _fresh(args: argparse.Namespace) -> tuple[str, torch.nn.Module, Mask, torch.nn.Module]:
    """A model name: pruned here by the pruning options, not saved."""
    original = _model(args, args.target)
    mask = _pruned_mask(original, args, args.input_shape or DEFAULT_SHAPE)
    return args.target, original, mask, mask.generate_pruned_model()


def _model(args: argparse.Namespace, name: str | None = None) -> torch.nn.Module:
    """The model the command names, with the weights it asks for (random ones by default)."""
    name = name or args.model
    weights, pretrained = getattr(args, "weights", None), getattr(args, "pretrained", False)
    if weights is not None and not name.startswith("torchvision:"):
        hint = " (a timm model takes --pretrained)" if name.startswith("timm:") else ""
        raise ValueError(f"--weights names torchvision's weights; {name} is not a torchvision model{hint}")
    if pretrained and not name.startswith("timm:"):
        hint = " (a torchvision model takes --weights DEFAULT)" if name.startswith("torchvision:") else ""
        raise ValueError(f"--pretrained asks timm for its weights; {name} is not a timm model{hint}")
    checkpoint = getattr(args, "checkpoint", None)  # one of the three at most (a mutually exclusive group)
    if checkpoint is not None and not Path(checkpoint).is_file():  # before building the model
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    model = build_model(name, weights=weights, pretrained=pretrained)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        model.eval()
    return model


def _weights_info(args: argparse.Namespace) -> dict[str, str | bool]:
    """The weights the command line asked for, as the spec's metadata records them."""
    asked = {"weights": getattr(args, "weights", None), "pretrained": getattr(args, "pretrained", False)}
    asked["checkpoint"] = getattr(args, "checkpoint", None)
    return {key: value for key, value in asked.items() if value}


def _pruning_info(args: argparse.Namespace, mask: Mask) -> dict[str, str | float | int | bool]:
    """The algorithm and target (``ratio``, ``target_flops`` or ``target_params``) the mask pruned by."""
    key, _, value = mask.settings.target.partition("=")
    info: dict[str, str | float | int | bool] = {"algorithm": args.algorithm, key: float(value)}
    info.update(allocation=mask.settings.allocation, steps=mask.settings.steps)
    if getattr(args, "depth", False):
        info["depth"] = True
    return info


def _described(pruning: dict) -> str:
    """``{"algorithm": "fpgm", "ratio": 0.3, "allocation": "uniform", ...}`` -> ``"fpgm, ratio=0.3 (uniform)"``."""
    target = ", ".join(f"{key}={pruning[key]}" for key in ("ratio", "target_flops", "target_params") if key in pruning)
    text = ", ".join(str(part) for part in (pruning.get("algorithm"), target) if part)
    if "allocation" in pruning:
        text += f" ({pruning['allocation']})"
    return text + (", with whole blocks" if pruning.get("depth") else "")


def _check_out(out: Path, force: bool) -> None:
    """Refuse ``--out`` before any work: a file, a folder holding a pruned model (without ``--force``), or a place
    where nothing can be written."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: a pruned model is saved as a folder, name a new one")
    if out.is_dir() and not force:
        held = sorted(entry.name for entry in out.iterdir() if entry.name in OWN_FILES)
        if held:
            raise FileExistsError(f"--out {out} already holds a pruned model ({', '.join(held)}): --force replaces it")
    parent = next(p for p in out.absolute().parents if p.exists())  # the folder is written beside, then renamed
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: cannot write in {parent}")


def _is_tensor_file(path: str | None) -> bool:
    """Whether ``--calib`` names inputs saved with ``torch.save`` (a ``.txt`` file is text for a language model)."""
    return path is not None and not str(path).endswith(".txt")


def _calibration(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """``--calib FILE.txt``'s batches (tokenized by an ``hf:`` folder's tokenizer, else bytes); none without it."""
    if args.calib is None or _is_tensor_file(args.calib):
        if args.algorithm in CALIBRATED:
            raise ValueError(f"--algorithm {args.algorithm} reads calibration text: give --calib FILE.txt")
        if args.model.startswith("hf:"):
            raise ValueError("an hf: model needs --calib FILE.txt (its example inputs are token ids)")
        return []
    folder = args.model[3:] if args.model.startswith("hf:") else None
    return text_batches(args.calib, folder)


def _pruned_mask(
    model: torch.nn.Module,
    args: argparse.Namespace,
    example: Sequence[int] | dict[str, torch.Tensor],
    calibration: Sequence[dict[str, torch.Tensor]] = (),
) -> Mask:
    name = args.algorithm
    algorithm = CALIBRATED[name](calibration) if name in CALIBRATED else ALGORITHMS[name]()
    mask = Mask(
        model,
        example if isinstance(example, dict) else None,
        input_shape=None if isinstance(example, dict) else example,
        algorithm=algorithm,
        ratio=args.ratio,
        target_flops=args.target_flops,
        target_params=getattr(args, "target_params", None),
        allocation=args.allocation,
        steps=args.steps,
        depth=getattr(args, "depth", False),
        recalibrate=_calibration_batches(args, example) if _is_tensor_file(args.calib) else None,
    )
    log.info("tracing %s", type(model).__name__)
    mask.make()
    for _ in progress(range(args.steps), desc="pruning", total=args.steps, unit="step"):
        mask.do_mask()
    return mask


def _calibration_batches(args: argparse.Namespace, shape: Sequence[int]) -> list[torch.Tensor]:
    """The ``--calib`` tensor file: one floating tensor of inputs ``(N, *shape[1:])``, cut into batches of
    ``--calib-batch-size``."""
    path, batch_size = args.calib, args.calib_batch_size
    try:
        images = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:  # an unreadable or unsafe file: say which and why
        raise ValueError(f"--calib {path}: not a tensor file saved with torch.save ({error})") from error
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != len(shape):
        if isinstance(images, torch.Tensor):
            got = f"a {images.dtype} tensor of shape {tuple(images.shape)}"
        else:
            got = f"a {type(images).__name__}"
        dims = ", ".join(map(str, shape[1:]))
        raise ValueError(f"--calib {path}: expected one floating tensor of inputs (N, {dims}), got {got}")
    if len(images) == 0 or batch_size < 1:
        raise ValueError(f"--calib {path}: {len(images)} inputs in batches of {batch_size}: nothing to run")
    return list(images.split(batch_size))


def _verify(mask: Mask, pruned: torch.nn.Module, shape: Sequence[int]) -> VerifyResult:
    batch = (max(2, shape[0]), *shape[1:])
    return verify(mask.model, pruned, torch.randn(batch, dtype=mask.example_inputs.dtype))


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        return parse_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit status 2), as the commands' errors are."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maskprune", description="Structural pruning by soft masks and exact export.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages, only results and errors")
    parser.add_argument("--debug", action="store_true", help="on an error, its traceback instead of one line")
    parser.add_argument(
        "--seed", type=int, default=0, help="torch seed: the random weights of the models and the example inputs"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = "torchvision:NAME, timm:NAME (timm installed), hf:FOLDER (prune only) or module.path:factory"

    sub = commands.add_parser("inspect", help="print the dependency groups and what is frozen")
    sub.add_argument("model", help=model_help)
    sub.add_argument("--input-shape", type=_input_shape, default=DEFAULT_SHAPE, help="example input, e.g. 1,3,224,224")
    sub.add_argument("--groups", action="store_true", help="print every group's members")
    sub.set_defaults(run=inspect)

    sub = commands.add_parser("prune", help="prune one shot, export, verify and save to --out")
    sub.add_argument("model", help=model_help)
    sub.add_argument("--input-shape", type=_input_shape, default=DEFAULT_SHAPE, help="example input, e.g. 1,3,224,224")
    sub.add_argument("--out", required=True, help="folder to write spec.json and model.safetensors to")
    sub.add_argument("--force", action="store_true", help="replace the pruned model a folder --out already holds")
    _weights_options(sub)
    sub.add_argument("--target-params", type=float, help="fraction of the parameters to keep, instead of --ratio")
    sub.add_argument("--depth", action="store_true", help="also remove whole residual blocks (decoder layers)")
    _pruning_options(sub, calibrated=True)
    sub.set_defaults(run=prune)

    sub = commands.add_parser("report", help="before/after table (and --plot) of a saved folder or of pruning a model")
    sub.add_argument("target", help=f"a folder written by `maskprune prune`, or a model: {model_help}")
    sub.add_argument("--model", help="the original model of a folder that does not record it")
    sub.add_argument("--input-shape", type=_input_shape, help="example input (default: the saved one, or 1,3,224,224)")
    sub.add_argument("--plot", help="write kept vs total channels per layer to this PNG")
    sub.add_argument(
        "--threads", type=_positive(int), default=1, help="threads the latency is timed on (default 1: steadier)"
    )
    sub.add_argument(
        "--min-time", type=_positive(float), default=1.0, help="seconds each model is timed for, at least (default 1)"
    )
    _weights_options(sub)
    _pruning_options(sub)
    sub.set_defaults(run=report)
    return parser


def _weights_options(sub: argparse.ArgumentParser) -> None:
    weights = sub.add_mutually_exclusive_group()
    weights.add_argument("--weights", metavar="NAME", help="torchvision weights to load: DEFAULT, IMAGENET1K_V1 …")
    weights.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    weights.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="a state dict to load (torch.save, read with weights_only=True, or .safetensors); without any of "
        "these three the weights are random",
    )


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"a positive {kind.__name__} is expected, got {text!r}")
        return value

    return parse


def _pruning_options(sub: argparse.ArgumentParser, calibrated: bool = False) -> None:
    names = sorted(ALGORITHMS) + (sorted(CALIBRATED) if calibrated else [])
    sub.add_argument("--algorithm", choices=names, default="l1", help="criterion (default l1)")
    sub.add_argument("--ratio", type=float, help="fraction of channels to remove (default 0.5)")
    sub.add_argument("--target-flops", type=float, help="fraction of FLOPs to remove instead of --ratio")
    sub.add_argument("--allocation", choices=("uniform", "global"), default="uniform", help="per group or ranked")
    sub.add_argument("--steps", type=int, default=1, help="do_mask() steps to reach the target (default 1)")
    sub.add_argument(
        "--calib",
        metavar="FILE",
        help="calibration inputs: a .txt file of text for an hf: language model (tokenized by its tokenizer, else "
        "bytes; read by the calibrated criteria), or one tensor of inputs saved with torch.save, on which the "
        f"BatchNorm statistics are re-estimated after pruning (maskprune.recalibrate_bn, at most {DEFAULT_BATCHES} "
        "batches)",
    )
    sub.add_argument("--calib-batch-size", type=int, default=32, help="inputs per --calib batch (default 32)")


if __name__ == "__main__":
    sys.exit(main())
