"""Where a fresh process spends its time loading a BLIP-2 checkpoint onto the GPU.

    python bench/profile_load.py MODEL_DIR

Prints one JSON object: seconds for importing torch, starting CUDA, importing the
transformers classes, the processor, ``from_pretrained`` straight to the GPU, the
same on the CPU followed by ``.to("cuda")``, and reading the safetensors files
directly onto the GPU (the floor).
"""

import json
import sys
import time
from pathlib import Path

marks = {}
t = time.perf_counter()


def mark(name: str) -> None:
    global t
    now = time.perf_counter()
    marks[name] = round(now - t, 3)
    t = now


import torch  # noqa: E402

mark("import torch")
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
mark("CUDA start")
from transformers import Blip2ForConditionalGeneration, Blip2Processor  # noqa: E402

mark("import transformers Blip2")
path = sys.argv[1]
Blip2Processor.from_pretrained(path)
mark("processor")
model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0})
torch.cuda.synchronize()
mark("from_pretrained device_map=cuda")
del model
torch.cuda.empty_cache()
mark("free")
model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).to("cuda")
torch.cuda.synchronize()
mark("from_pretrained cpu then .to(cuda)")
del model
torch.cuda.empty_cache()
from safetensors.torch import load_file  # noqa: E402

mark("free 2")
tensors = {}
for f in sorted(Path(path).glob("*.safetensors")):
    tensors.update(load_file(str(f), device="cuda"))
torch.cuda.synchronize()
mark("safetensors load_file to cuda (floor)")
print(json.dumps(marks))
