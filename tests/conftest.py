import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: kernels run on CPU
