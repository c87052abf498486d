"""Run under torchrun by test_distributed.py: train a config given as JSON, then save this rank's
model and method state to OUT/rank{RANK}.pt so the test can compare the ranks.

    torchrun --nproc_per_node=2 tests/ddp_worker.py '{"method": "pixel_contrast", ...}'
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
    cfg = make_config(get_method(settings["method"]).config_class, settings.pop("data", "synthetic"), **settings)
    trainer = Trainer(cfg, get_method(cfg.method), progress=False)
    trainer.fit()
    state = {"model": trainer.model.state_dict(), "method": trainer.method.state_dict(), "step": trainer.step}
    torch.save(state, f"{cfg.out}/rank{trainer.dist.rank}.pt")
    cleanup()
