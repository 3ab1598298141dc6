"""Stage 6 library: export the fine-tuned network as self-describing files.

Three formats (``export.format``; several may be given):

* ``torchscript``: ``model.pt``, ``torch.jit.script`` of the network (TorchScript is
  deprecated in current torch, which warns on load; kept because it loads everywhere);
* ``torch.export``: ``model.pt2``, an ``ExportedProgram`` with a dynamic batch dimension
  (``torch.export.load(path).module()``);
* ``onnx``: ``model.onnx`` from torch's current (dynamo) exporter, dynamic batch; needs the
  ``[onnx]`` extra (onnx, onnxscript; onnxruntime for the check).

Each file carries ``branchnas.json`` (an extra file; an ONNX metadata property) with what a
user needs and cannot see in the weights: the task names, kinds and output shapes, the input
size, the normalisation (mean and std on the 0..1 pixel scale), the tree, the fine-tuning
variant and the branchnas version. Plain PyTorch reads it (no branchnas needed)::

    extra = {"branchnas.json": ""}
    model = torch.jit.load("model.pt", _extra_files=extra)
    meta = json.loads(extra["branchnas.json"])

The exported network checks its input (:class:`InputChecked`): a wrong channel count or
image size fails with a message that names the expected shape, and a floating input of
another dtype is converted to float32 (an integer image is refused: it must be scaled and
normalised first).

Every export is checked before it is moved into place: the file is loaded in a separate
Python process (``python -I``) in which importing branchnas is blocked, run on fixed inputs,
and its outputs compared with the eager model's. A difference above ``export.atol`` raises
:class:`branchnas.errors.ExportMismatch` and leaves no file behind. ``docs/exported-model.md``
is the user's guide to the file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from branchnas.errors import ExportMismatch, UserError, unknown_choice

if TYPE_CHECKING:
    pass

__all__ = [
    "FORMATS",
    "FILE_NAMES",
    "InputChecked",
    "METADATA_FILE",
    "METADATA_FORMAT",
    "build_metadata",
    "export_model",
    "read_metadata",
    "check_in_clean_process",
]

FORMATS = ("torchscript", "torch.export", "onnx")
#: The stage's file name per format.
FILE_NAMES = {"torchscript": "model.pt", "torch.export": "model.pt2", "onnx": "model.onnx"}
#: Name of the extra file in the TorchScript archive (and of the ONNX metadata property).
METADATA_FILE = "branchnas.json"
#: ``format`` field of the metadata; bump it when the layout changes.
METADATA_FORMAT = "branchnas.export/1"
#: Images in the fixed check batch.
CHECK_BATCH = 2

# Run by `python -I` in a fresh process: blocks branchnas, proves the block works, loads the
# file with plain torch, runs it on the saved inputs and saves the outputs and the metadata.
_GUARD = r"""
import importlib.abc, json, sys

BLOCKED = ("branchnas", "branchnas_cli")

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError("blocked by the export check: " + name, name=name)
        return None

sys.meta_path.insert(0, _Block())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        print(json.dumps({"error": name + " could still be imported"}))
        sys.exit(3)
"""

_CHECK_SCRIPT = _GUARD + r"""
import warnings
warnings.simplefilter("ignore", FutureWarning)
import torch

model_path, inputs_path, outputs_path, fmt = sys.argv[1:5]
inputs = torch.load(inputs_path, weights_only=True)
if fmt == "torchscript":
    extra = {"branchnas.json": ""}
    model = torch.jit.load(model_path, map_location="cpu", _extra_files=extra)
    meta = json.loads(extra["branchnas.json"])
    with torch.no_grad():
        outputs = dict(model(inputs))
elif fmt == "torch.export":
    extra = {"branchnas.json": ""}
    program = torch.export.load(model_path, extra_files=extra)
    meta = json.loads(extra["branchnas.json"])
    with torch.no_grad():
        outputs = dict(program.module()(inputs))
else:
    import onnx, onnxruntime
    proto = onnx.load(model_path)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["branchnas.json"])
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    outputs = {n: torch.from_numpy(v) for n, v in zip(names, values)}
torch.save(outputs, outputs_path)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"metadata": meta, "leaked": leaked, "torch": torch.__version__}))
"""


# --------------------------------------------------------------------------- metadata


def build_metadata(net: nn.Module, info: Mapping[str, Any]) -> dict[str, Any]:
    """The ``branchnas.json`` of an export.

    Args:
        net: The fine-tuned :class:`branchnas.models.BranchedNet` (its output shapes are
            measured on one zero image).
        info: The non-weight contents of ``finetune/model.pt`` (tasks, ``in_channels``,
            ``image_size``, ``mean``, ``std``, ``partitions``, ``tree``, ``backbone``).
    """
    from branchnas import __version__
    from branchnas.tasks import Task

    channels, size = int(info["in_channels"]), [int(s) for s in info["image_size"]]
    with torch.no_grad():
        outputs = _eager_outputs(net, torch.zeros(1, channels, *size))
    tasks = []
    for fields in info["tasks"]:
        task = Task(**fields)
        tasks.append({
            "name": task.name,
            "kind": task.kind,
            "num_classes": task.num_classes,
            "channels": task.out_channels,
            "output_shape": ["B", *outputs[task.name].shape[1:]],
            "metrics": list(task.metric_names),
        })
    return {
        "format": METADATA_FORMAT,
        "branchnas_version": __version__,
        "torch_version": torch.__version__,
        "task_names": [t["name"] for t in tasks],
        "tasks": tasks,
        "input": {
            "shape": ["B", channels, *size],
            "channels": channels,
            "height": size[0],
            "width": size[1],
            "dtype": "float32",
            "layout": "NCHW",
            "scale": 1 / 255,
            "mean": list(info["mean"]),
            "std": list(info["std"]),
        },
        "preprocessing": "resize to height x width; x = (pixel / 255 - mean) / std per channel",
        "variant": info.get("variant", "plain"),
        "partitions": info["partitions"],
        "tree": info.get("tree"),
        "backbone": info.get("backbone"),
        "dataset": info.get("dataset"),
    }


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``branchnas.json`` metadata of an exported file (``.pt``, ``.pt2`` or ``.onnx``).

    Raises:
        UserError: The file does not exist or holds no branchnas metadata.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; export a model with `branchnas export`")
    extra = {METADATA_FILE: ""}
    try:
        if path.suffix == ".onnx":
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            extra[METADATA_FILE] = props.get(METADATA_FILE, "")
        elif path.suffix == ".pt2":
            torch.export.load(str(path), extra_files=extra)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except ImportError:
        raise UserError(f"reading {path} needs the onnx package: pip install 'branchnas[onnx]'") from None
    except Exception as err:  # noqa: BLE001 - a foreign or damaged file, whatever torch raises
        raise UserError(f"{path} is not a file written by `branchnas export` ({type(err).__name__})") from None
    if not extra[METADATA_FILE]:
        raise UserError(f"{path} holds no {METADATA_FILE}; it was not written by `branchnas export`")
    return json.loads(extra[METADATA_FILE])


# --------------------------------------------------------------------------- exporting


def _eager_outputs(net: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
    """The eager model's outputs (a separate function so a test can corrupt them)."""
    with torch.no_grad():
        return {k: v.detach().cpu() for k, v in net(inputs).items()}


def _fixed_inputs(metadata: Mapping[str, Any]) -> Tensor:
    shape = [CHECK_BATCH, *metadata["input"]["shape"][1:]]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def export_model(
    net: nn.Module,
    path: str | Path,
    metadata: Mapping[str, Any],
    *,
    format: str = "torchscript",
    check: bool = True,
    atol: float = 1e-5,
) -> dict[str, Any]:
    """Write ``net`` to ``path`` in ``format`` with ``metadata``, checked, atomically.

    The file is written next to ``path`` under a temporary name, checked in a clean process
    (see :func:`check_in_clean_process`) and only then renamed to ``path``; on any failure no
    file is left and an existing ``path`` is untouched.

    Args:
        net: The network (moved to the CPU and put in eval mode).
        path: The output file.
        metadata: See :func:`build_metadata`.
        format: ``torchscript``, ``torch.export`` or ``onnx`` (needs the ``[onnx]`` extra).
        check: Run the clean-process check.
        atol: Largest allowed absolute difference between the file's and the eager outputs.

    Returns:
        ``{"path", "format", "checked", "max_abs_diff": {task: diff}}``.

    Raises:
        ExportMismatch: The reloaded file's outputs differ from the eager outputs.
        UserError: An unknown format, or ONNX without the ``onnx`` package.
    """
    if format not in FORMATS:
        raise UserError(unknown_choice("export format", format, FORMATS))
    net = net.cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = _fixed_inputs(metadata)
    checked = InputChecked(net, metadata["input"]["channels"], metadata["input"]["height"],
                           metadata["input"]["width"]).eval()
    if format == "onnx":
        if check and importlib.util.find_spec("onnxruntime") is None:
            raise UserError("checking an ONNX export needs onnxruntime: pip install 'branchnas[onnx]' "
                            "(or --set export.check=false)")
        data = _to_onnx(checked, inputs, metadata)
    elif format == "torch.export":
        data = _to_torch_export(checked, inputs, metadata)
    else:
        data = _to_torchscript(checked, metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        diffs: dict[str, float] = {}
        if check:
            diffs = check_in_clean_process(tmp, inputs, _eager_outputs(net, inputs), atol=atol, format=format)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return {"path": str(path), "format": format, "checked": check, "max_abs_diff": diffs}


def _to_torchscript(net: nn.Module, metadata: Mapping[str, Any]) -> bytes:
    with warnings.catch_warnings():
        # torch marks TorchScript as deprecated; it is still the format plain PyTorch loads.
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(net)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def _batch_dim() -> dict[str, Any]:
    """The dynamic batch dimension of the image input (``x``)."""
    return {"x": {0: torch.export.Dim("batch", min=1, max=65536)}}


def _to_torch_export(net: nn.Module, inputs: Tensor, metadata: Mapping[str, Any]) -> bytes:
    program = torch.export.export(_ImageOnly(net), (inputs,), dynamic_shapes=_batch_dim())
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def _to_onnx(net: nn.Module, inputs: Tensor, metadata: Mapping[str, Any]) -> bytes:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's dynamo exporter needs it)
    except ImportError:
        raise UserError("ONNX export needs the onnx and onnxscript packages: pip install 'branchnas[onnx]' "
                        "(or use --format torchscript)") from None

    names = list(metadata["task_names"])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_TupleOutputs(net, names), (inputs,), input_names=["image"], output_names=names,
                                    dynamic_shapes=_batch_dim(), dynamo=True, verbose=False)
    with tempfile.TemporaryDirectory(prefix="branchnas-onnx-") as tmp:
        program.save(str(Path(tmp) / "model.onnx"))
        proto = onnx.load(str(Path(tmp) / "model.onnx"))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_FILE, json.dumps(metadata)
    return proto.SerializeToString()


class InputChecked(nn.Module):
    """The network behind an input check: ``(B, channels, height, width)`` images, float32.

    A wrong rank, channel count or size raises ``ValueError`` naming the expected shape and
    where the preprocessing is described; a floating input of another dtype is converted to
    float32; any other dtype (an 8-bit image) is refused.
    """

    def __init__(self, net: nn.Module, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.net = net
        self.channels, self.height, self.width = int(channels), int(height), int(width)

    def forward(self, x: Tensor, tasks: list[str] | None = None) -> dict[str, Tensor]:
        expected = "(B, " + str(self.channels) + ", " + str(self.height) + ", " + str(self.width) + ")"
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] != self.height or x.shape[3] != self.width:
            raise ValueError("branchnas model: expected images of shape " + expected + "; got "
                             + str(list(x.shape)) + ". Resize to the input size and normalise as branchnas.json says.")
        if not x.is_floating_point():
            raise ValueError("branchnas model: expected float images scaled to 0..1 and normalised with the mean "
                             "and std in branchnas.json; got dtype " + str(x.dtype))
        return self.net(x.to(torch.float32), tasks)


class _ImageOnly(nn.Module):
    """``net(x)`` with the image as the only input (torch.export and ONNX have no task list)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.net(x)


class _TupleOutputs(nn.Module):
    """ONNX names outputs by position: the task dict becomes a tuple in task order."""

    def __init__(self, net: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.net, self.names = net, list(names)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.net(x)
        return tuple(out[n] for n in self.names)


def check_in_clean_process(
    path: str | Path,
    inputs: Tensor,
    expected: Mapping[str, Tensor],
    *,
    atol: float,
    format: str = "torchscript",
    timeout: float = 300,
) -> dict[str, float]:
    """Load ``path`` in a fresh ``python -I`` process where branchnas cannot be imported.

    The child blocks ``branchnas`` and ``branchnas_cli`` with a ``sys.meta_path`` finder,
    fails if either still imports, loads the file with plain torch, reads its metadata, runs
    it on ``inputs`` and hands the outputs back; they must match ``expected`` within ``atol``.

    Returns:
        The largest absolute difference per task.

    Raises:
        ExportMismatch: Different tasks or shapes, a difference above ``atol``, a NaN, the
            metadata missing, or the child failing.
    """

    with tempfile.TemporaryDirectory(prefix="branchnas-export-check-") as tmp:
        inputs_path, outputs_path = Path(tmp) / "inputs.pt", Path(tmp) / "outputs.pt"
        torch.save(inputs.detach().cpu(), inputs_path)
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _CHECK_SCRIPT, str(path), str(inputs_path), str(outputs_path), format],
            capture_output=True, text=True, timeout=timeout, cwd=tmp,
        )
        if proc.returncode != 0:
            last = (proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportMismatch(f"the exported file failed to load or run in a clean process: {last}")
        status = json.loads(proc.stdout.strip().splitlines()[-1])
        if status.get("leaked"):
            raise ExportMismatch(f"the clean-process check imported {', '.join(status['leaked'])}; the file depends on branchnas")
        if not status.get("metadata"):
            raise ExportMismatch(f"the exported file has no {METADATA_FILE} metadata")
        got = torch.load(outputs_path, weights_only=True)
    if list(got) != list(expected):
        raise ExportMismatch(f"the exported file returns tasks {list(got)}; the eager model returns {list(expected)}")
    diffs = {}
    for task, want in expected.items():
        have = got[task]
        if tuple(have.shape) != tuple(want.shape):
            raise ExportMismatch(
                f"task '{task}': the exported file returns shape {tuple(have.shape)}; eager returns {tuple(want.shape)}"
            )
        diff = (have.double() - want.double()).abs()
        worst = float(diff.max()) if diff.numel() else 0.0
        if not torch.isfinite(diff).all() or worst > atol:
            raise ExportMismatch(
                f"task '{task}': the exported file differs from the eager model by {worst:.3g} > atol {atol:g}; "
                "nothing was written"
            )
        diffs[task] = worst
    return diffs
