"""benchmarks/gpu_kernels.py's report survives a run cut short: it is rewritten after every row, and the
torch.compile rows stay within their budget. (The measurements themselves need the GPU machine.)"""
from __future__ import annotations

import json

from benchmarks import gpu_kernels


def _info() -> gpu_kernels.DeviceInfo:
    return gpu_kernels.DeviceInfo(name="test GPU", sm_count=132, l2_bytes=50 << 20, copy_gbps=3000.0, nominal_gbps=3350.0)


def test_report_is_on_disk_after_every_row(tmp_path):
    report = gpu_kernels.Report(_info(), tmp_path, large_batch=256)
    report.write()
    assert "test GPU" in (tmp_path / "gpu_kernels_report.md").read_text()
    report.add_kernel(gpu_kernels.KernelRow(op="depthwise_liteconv_f16", dtype="float16", stage="conv2", shape=(1, 64, 64, 32),
                                            bytes_moved=1 << 20, fused_us=2.0, torch_us=5.0, l2_resident=True))
    assert "| depthwise_liteconv_f16 |" in (tmp_path / "gpu_kernels_report.md").read_text()
    report.add_model(gpu_kernels.ModelRow(label="osnet_x1_0 PyTorch eager (cuDNN)", latency_ms=1.5, images_per_s=900.0))
    saved = json.loads((tmp_path / "gpu_kernels_report.json").read_text())
    assert len(saved["kernels"]) == 1 and saved["models"][0]["images_per_s"] == 900.0


def test_compile_rows_stop_at_their_budget():
    rows = []
    gpu_kernels.compiled_rows(256, "max-autotune", timeout_s=240, budget_s=5, done=rows.append)
    assert [row.label for row in rows] == ["osnet_x1_0 torch.compile(max-autotune)", "resnet50 torch.compile(max-autotune)"]
    assert all(row.images_per_s is None and "budget of 5 s was spent" in row.note for row in rows)
