"""HTA under FSDP2 (``torch.distributed.fsdp.fully_shard``): two real processes over gloo on the CPU.

Each rank trains on its own half of every batch; FSDP averages the gradients, so after a few AdamW steps the
adapter must equal that of one unsharded model trained on the whole batches (checked on rank 0), and the gathered
full state dict must hold every adapter parameter under PEFT's names.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import copy, os, sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from peft import get_peft_model
import hh_peft

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 16)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


torch.manual_seed(0)
config = hh_peft.HouseholderConfig(target_modules=["fc1", "fc2"], modules_to_save=["head"], init_weights=False)
model = get_peft_model(Net(), config)
reference = copy.deepcopy(model)
for block in model.base_model.model.blocks:
    fully_shard(block)
fully_shard(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
ref_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
data = torch.Generator().manual_seed(1)
for step in range(4):
    x, y = torch.randn(8 * world, 16, generator=data), torch.randint(0, 3, (8 * world,), generator=data)
    mine = slice(8 * rank, 8 * (rank + 1))
    nn.functional.cross_entropy(model(x[mine]), y[mine]).backward()
    optimizer.step()
    optimizer.zero_grad()
    nn.functional.cross_entropy(reference(x), y).backward()  # the whole batch, one process
    ref_optimizer.step()
    ref_optimizer.zero_grad()

state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    expected = {k: v for k, v in reference.state_dict().items() if "hta_" in k}
    got = {k: v for k, v in state.items() if "hta_" in k}
    assert got.keys() == expected.keys() and len(got) == 4 * 5, sorted(got)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
    print("FSDP-OK", len(got), flush=True)
# Teardown: gloo can abort a rank at interpreter exit ("terminate called without an active exception") while
# FSDP still holds its communication state (seen 1 in ~20 CI runs). Free that state, leave together, and skip the
# interpreter's finalisation: everything this test checks has been printed by now.
del model, optimizer
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
'''


@pytest.mark.slow
def test_hta_trains_under_fsdp2_like_one_unsharded_process(tmp_path):
    script = tmp_path / "fsdp_hta.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "FSDP-OK 20" in output, output[-4000:]
