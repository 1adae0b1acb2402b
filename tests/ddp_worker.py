"""Run `lora` as one rank of a torchrun job, and afterwards save this rank's trainable weights
(test-only hook: the product writes only rank 0's adapter, so ranks are compared here)."""

import atexit
import os
from pathlib import Path


def main() -> None:
    import torch

    from lora_cli.train import run as train_module
    from lora_cli.cli import main as lora

    dump = Path(os.environ["LORA_TEST_RANK_DUMP"])
    original = train_module.SafeTrainer.train

    def train_and_dump(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        weights = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        torch.save(weights, dump / f"rank{os.environ['RANK']}.pt")
        return out

    train_module.SafeTrainer.train = train_and_dump
    # registered first, so it runs last at exit: whether lora left the process group open
    rank = os.environ["RANK"]
    atexit.register(lambda: (dump / f"rank{rank}.group-open-at-exit").write_text(str(torch.distributed.is_initialized())))
    lora()  # the command line's own exit: sys.exit with the command's code


if __name__ == "__main__":
    main()
