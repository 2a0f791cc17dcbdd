import os

# Nothing may reach the Hugging Face Hub from the tests (the CI machine has no access anyway).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

# Two shared cores: more threads only add contention.
torch.set_num_threads(1)
