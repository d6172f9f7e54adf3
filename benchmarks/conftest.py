import os

import torch

if not torch.cuda.is_available():
    # The triton backend is not benchmarked on CPU (the interpreter is for tests only).
    os.environ.setdefault("TRITON_INTERPRET", "0")
