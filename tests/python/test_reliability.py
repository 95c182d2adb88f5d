"""Killed writers, determinism across processes, resume after a kill (issue 7's process-level cases).

Each case runs small Python programs in fresh processes (this file's CHILD script) so that a
SIGKILL really interrupts a save or a training run.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import os, sys, time, torch
sys.path.insert(0, os.environ["EDKM_TEST_PYTHONPATH"])
import edkm
from edkm import format as fmt
from transformers import LlamaConfig, LlamaForCausalLM

mode, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
torch.use_deterministic_algorithms(True)
cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(cfg)
edkm.palettize_(model, edkm.Config(bits=3, group_size=16))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def step():
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def checkpoint(path, k):
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": k}, tmp)
    os.replace(tmp, path)


if mode == "save":                      # train 2 steps, finalize, save
    for _ in range(2):
        step()
    edkm.finalize(model)
    edkm.save(model, out)
elif mode == "slow-save":               # like save, but stall after the first tensor
    for _ in range(2):
        step()
    edkm.finalize(model)
    real = fmt.FileWriter.write
    def stalled(self, name, tensor):
        real(self, name, tensor)
        self._file.flush()
        open(out + ".writing", "w").close()
        time.sleep(60)
    fmt.FileWriter.write = stalled
    edkm.save(model, out)
elif mode in ("train", "train-killed", "resume"):
    total = int(sys.argv[3])
    start = 0
    if mode == "resume":
        ckpt = torch.load(out + ".ckpt", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        start = ckpt["step"]
    for k in range(start, total):
        step()
        checkpoint(out + ".ckpt", k + 1)
        if mode == "train-killed" and k + 1 == int(sys.argv[4]):
            open(out + ".stop", "w").close()
            time.sleep(60)
    torch.save(model.state_dict(), out)
"""


def run_child(tmp_path, *args, wait=True):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, EDKM_TEST_PYTHONPATH=str(ROOT / "python"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    if wait:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    return proc


def wait_for(path: Path, proc, timeout=240):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read().decode()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_inputs_give_bit_identical_files_across_processes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run_child(tmp_path, "save", a)
    run_child(tmp_path, "save", b)
    assert sha(a) == sha(b)


def test_killed_save_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "m.safetensors"
    run_child(tmp_path, "save", path)
    before = sha(path)
    proc = run_child(tmp_path, "slow-save", path, wait=False)
    wait_for(Path(str(path) + ".writing"), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert sha(path) == before  # the real name still holds the complete old file
    import edkm

    edkm.load(path)  # and it loads
    # what the killed writer left is a hidden temporary file, never the real name
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.safetensors.")]
    assert all(name.endswith(".tmp") for name in leftovers)


def test_resume_after_kill_reaches_the_same_weights(tmp_path):
    import torch

    full = tmp_path / "full.pt"
    run_child(tmp_path, "train", full, 5)
    killed = tmp_path / "killed.pt"
    proc = run_child(tmp_path, "train-killed", killed, 5, 3, wait=False)
    wait_for(Path(str(killed) + ".stop"), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not killed.exists()
    run_child(tmp_path, "resume", killed, 5)
    a, b = torch.load(full, weights_only=False), torch.load(killed, weights_only=False)
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), name
        else:
            assert a[name] == b[name], name
