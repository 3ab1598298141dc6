"""Export: the TorchScript file runs without branchnas, carries its metadata, and fails loudly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from branchnas import export
from branchnas.backbones import build_backbone
from branchnas.errors import ExportMismatch, UserError
from branchnas.heads import build_head
from branchnas.models import BranchedNet
from branchnas.recipe import BackboneConfig
from branchnas.tasks import Task

# torch marks TorchScript as deprecated; it is still the format plain PyTorch loads.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")

TASKS = [Task("shape", "classification", "shape", num_classes=4), Task("seg", "segmentation", "seg", num_classes=3)]
SIZE = (16, 16)


@pytest.fixture(scope="module")
def net_and_info():
    torch.manual_seed(0)
    cfg = BackboneConfig(name="resnet20", width=0.25)
    backbone = build_backbone(cfg, 3, SIZE)
    heads = {t.name: build_head(t, backbone.out_channels, backbone.reduction, SIZE) for t in TASKS}
    tree = [[("shape", "seg")], [("shape", "seg")], [("shape",), ("seg",)]]
    net = BranchedNet(tree, backbone, heads, tasks=[t.name for t in TASKS]).eval()
    info = {
        "tasks": [{"name": t.name, "kind": t.kind, "target": t.target, "num_classes": t.num_classes,
                   "channels": t.channels, "weight": 1.0, "loss_name": ""} for t in TASKS],
        "in_channels": 3, "image_size": list(SIZE), "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25],
        "partitions": net.partitions(), "tree": net.partitions(), "backbone": {"name": "resnet20"},
    }
    return net, info


def test_export_runs_in_a_clean_process_and_matches(tmp_path, net_and_info):
    net, info = net_and_info
    path = tmp_path / "model.pt"
    result = export.export_model(net, path, export.build_metadata(net, info), atol=1e-5)
    assert path.exists() and result["checked"]
    assert set(result["max_abs_diff"]) == {"shape", "seg"}
    assert all(d <= 1e-5 for d in result["max_abs_diff"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left
    loaded = torch.jit.load(str(path))
    x = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        eager, scripted = net(x), loaded(x)
    for t in ("shape", "seg"):
        torch.testing.assert_close(scripted[t], eager[t], rtol=0, atol=1e-5)
    assert list(loaded(x, ["seg"])) == ["seg"]


def test_metadata_is_readable_with_plain_torch(tmp_path, net_and_info):
    net, info = net_and_info
    path = tmp_path / "model.pt"
    export.export_model(net, path, export.build_metadata(net, info), check=False)
    extra = {"branchnas.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra["branchnas.json"])
    assert meta["task_names"] == ["shape", "seg"]
    assert meta["tasks"][0]["kind"] == "classification" and meta["tasks"][0]["output_shape"] == ["B", 4]
    assert meta["tasks"][1]["output_shape"] == ["B", 3, 16, 16]
    assert meta["input"]["shape"] == ["B", 3, 16, 16]
    assert meta["input"]["mean"] == [0.5, 0.4, 0.3] and meta["input"]["std"] == [0.2, 0.2, 0.25]
    assert meta["partitions"] == [[["shape", "seg"]], [["shape", "seg"]], [["shape"], ["seg"]]]
    assert meta["branchnas_version"]
    assert export.read_metadata(path) == meta


def test_the_check_process_cannot_import_branchnas():
    code = export._GUARD + "\nimport branchnas.models\n"
    blocked = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120)
    assert blocked.returncode != 0 and "blocked by the export check: branchnas" in blocked.stderr
    # Without the guard the same interpreter does import it: the guard is what blocks it.
    free = subprocess.run([sys.executable, "-I", "-c", "import branchnas.models"], capture_output=True, timeout=120)
    assert free.returncode == 0


def test_a_mismatch_fails_loudly_and_writes_nothing(tmp_path, net_and_info, monkeypatch):
    net, info = net_and_info
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous export")
    real = export._eager_outputs

    def corrupted(model, inputs):
        out = real(model, inputs)
        out["seg"] = out["seg"] + 1e-3
        return out

    monkeypatch.setattr(export, "_eager_outputs", corrupted)
    with pytest.raises(ExportMismatch, match=r"task 'seg': .* differs from the eager model by 0\.001 > atol 1e-05"):
        export.export_model(net, path, export.build_metadata(net, info), atol=1e-5)
    assert path.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_corrupted_file_fails_loudly(tmp_path, net_and_info, monkeypatch):
    net, info = net_and_info
    monkeypatch.setattr(export, "_to_torchscript", lambda net, metadata: b"not a torchscript archive")
    with pytest.raises(ExportMismatch, match="failed to load or run in a clean process"):
        export.export_model(net, tmp_path / "model.pt", export.build_metadata(net, info))
    assert not (tmp_path / "model.pt").exists()


def test_onnx_without_the_package_says_what_to_install(tmp_path, net_and_info, monkeypatch):
    import sys

    net, info = net_and_info
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install 'branchnas\[onnx\]'"):
        export.export_model(net, tmp_path / "model.onnx", export.build_metadata(net, info), format="onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_unknown_format_lists_the_choices(tmp_path, net_and_info):
    net, info = net_and_info
    with pytest.raises(UserError, match="choose one of: onnx, torch.export, torchscript"):
        export.export_model(net, tmp_path / "m", export.build_metadata(net, info), format="tflite")


# --------------------------------------------------------------------------- every format


def _reload(path, fmt):
    """Load an export as plain torch / onnxruntime would; a callable on a batch of images."""
    if fmt == "torchscript":
        model = torch.jit.load(str(path))
        return lambda x: dict(model(x))
    if fmt == "torch.export":
        module = torch.export.load(str(path)).module()
        return lambda x: dict(module(x))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda x: {n: torch.from_numpy(v) for n, v in zip(names, session.run(None, {"image": x.numpy()}), strict=True)}


@pytest.mark.parametrize(("fmt", "atol"), [("torchscript", 1e-5), ("torch.export", 1e-5), ("onnx", 1e-4)])
def test_every_format_reloads_without_branchnas_and_matches_eager_at_any_batch(tmp_path, net_and_info, fmt, atol):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    net, info = net_and_info
    path = tmp_path / export.FILE_NAMES[fmt]
    result = export.export_model(net, path, export.build_metadata(net, info), format=fmt, atol=atol)
    assert result["checked"] and max(result["max_abs_diff"].values()) <= atol  # `python -I`, branchnas blocked
    run = _reload(path, fmt)
    for batch in (1, 5):  # the batch dimension is dynamic in every format
        x = torch.randn(batch, 3, *SIZE)
        with torch.no_grad():
            eager, loaded = net(x), run(x)
        for task in ("shape", "seg"):
            torch.testing.assert_close(loaded[task], eager[task], rtol=0, atol=atol)
    meta = export.read_metadata(path)
    assert meta["variant"] == "plain" and meta["task_names"] == ["shape", "seg"]


def test_the_exported_model_checks_its_input(tmp_path, net_and_info):
    net, info = net_and_info
    path = tmp_path / "model.pt"
    export.export_model(net, path, export.build_metadata(net, info))
    model = torch.jit.load(str(path))
    for bad in (torch.randn(2, 3, 20, 16), torch.randn(2, 1, *SIZE), torch.randn(3, *SIZE)):
        with pytest.raises(Exception, match=r"expected images of shape \(B, 3, 16, 16\)"):
            model(bad)
    with pytest.raises(Exception, match="expected float images"):
        model(torch.zeros(2, 3, *SIZE, dtype=torch.uint8))
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64)  # converted to float32, not a cryptic dtype error
    with torch.no_grad():
        torch.testing.assert_close(model(x)["seg"], net(x.float())["seg"], rtol=0, atol=1e-5)
    export.export_model(net, tmp_path / "model.pt2", export.build_metadata(net, info), format="torch.export")
    module = torch.export.load(str(tmp_path / "model.pt2")).module()
    with pytest.raises(Exception, match=r"x.size\(\)\[2\] == 16"):  # torch.export's own shape guard
        module(torch.randn(2, 3, 20, 16))
