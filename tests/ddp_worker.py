"""Run under torchrun by test_distributed.py: train a config given as JSON, then save this rank's
model and method state (and the model's weights before training) to OUT/rank{RANK}.pt so the test
can compare the ranks. Run without torchrun it is one process (rank 0) training the same config.

    torchrun --nproc_per_node=2 tests/ddp_worker.py '{"method": "pixel_contrast", ...}'

``"bn_eval": true`` (not a setting) keeps every BatchNorm layer in eval mode while training: it
normalises with its running statistics (never updated), so no layer depends on how the batch is
split over the processes and 2 processes can be compared with 1 on the global batch.
"""

import json
import sys

import torch

from ctxseg.config import make_config
from ctxseg.engine.distributed import cleanup
from ctxseg.engine.trainer import Trainer
from ctxseg.methods import get_method

if __name__ == "__main__":
    settings = json.loads(sys.argv[1])
    if settings.pop("bn_eval", False):
        from torch.nn.modules.batchnorm import _BatchNorm

        _BatchNorm.train = lambda self, mode=True: torch.nn.Module.train(self, False)
    cfg = make_config(get_method(settings["method"]).config_class, settings.pop("data", "synthetic"), **settings)
    trainer = Trainer(cfg, get_method(cfg.method), progress=False)
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    state = {"model": trainer.model.state_dict(), "method": trainer.method.state_dict(), "step": trainer.step,
             "init": init}
    torch.save(state, f"{cfg.out}/rank{trainer.dist.rank}.pt")
    cleanup()
