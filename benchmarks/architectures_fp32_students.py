"""Test top-1 of each FP32 student of ``architectures_results.json`` (its checkpoint, in PyTorch), beside the
INT8 rows: until commit "architectures: FP32 is the student", the table's FP32 column was the export's
model.fp32.onnx of the QAD checkpoint, i.e. the INT8 weights with float activations.

    .venv/bin/python benchmarks/architectures_fp32_students.py      # about 3 min; needs benchmarks/_work/architectures
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from edgekd.config import DataConfig  # noqa: E402
from edgekd.export import load_for_export, reference_logits  # noqa: E402
from edgekd.finetune import load_data  # noqa: E402

torch.set_num_threads(2)
rows = json.loads((ROOT / "benchmarks" / "architectures_results.json").read_text())
data = load_data(DataConfig(train_subset=4000), 0, store_size=32)
labels = data.test.labels.numpy()
print("| student | layout | FP32 student test % | INT8 weights in float (old FP32 column) % | INT8 test % | INT8 - FP32 student (points) |")
print("|---|---|---|---|---|---|")
for name in dict.fromkeys(r["student"] for r in rows):
    model = load_for_export(ROOT / "benchmarks" / "_work" / "architectures" / name / "fp32" / "best.pt")[0]
    fp32 = float((reference_logits(model, model.preprocess(data.test.images)).argmax(1) == labels).mean())
    for r in (r for r in rows if r["student"] == name):
        print(f"| {name} | {r['layout']} | {100 * fp32:.2f} | {100 * r['fp32_test_top1']:.2f} | {100 * r['int8_test_top1']:.2f} | "
              f"{100 * (r['int8_test_top1'] - fp32):+.2f} |", flush=True)
