import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# The bars are stated for two threads (the CI and developer machines have two cores).
torch.set_num_threads(int(os.environ.get("RMI_BENCH_THREADS", "2")))
