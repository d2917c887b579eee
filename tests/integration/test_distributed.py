"""DDP (gloo, 2 CPU processes) training step on an fpn_fast backbone equals a single-process step.

Each rank runs this file as a script on half the batch; the test compares the parameters they end
with against one SGD step on the whole batch here. FrozenBatchNorm2d keeps no batch statistics,
so the two halves are independent and the mean-reduced losses average to the full-batch loss.
"""
import os
import socket
import subprocess
import sys

import torch

import fpn_fast

WORLD_SIZE = 2
BATCH = 4
LR = 0.5
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _build():
    return fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", trainable_layers=5)


def _loss(features):
    # Mean-reduced over the batch (and everything else): DDP's gradient average over equal
    # halves then equals the gradient of this loss on the full batch.
    return sum((f ** 2).mean() for f in features.values())


def _sgd_step(model, images):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer.zero_grad()
    loss = _loss(model(images))
    loss.backward()
    optimizer.step()
    return loss.detach()


def _worker(rank: int, port: int, workdir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        model = _build()
        model.load_state_dict(torch.load(os.path.join(workdir, "init.pt"), weights_only=True))
        images = torch.load(os.path.join(workdir, "images.pt"), weights_only=True)
        half = BATCH // WORLD_SIZE
        ddp = DistributedDataParallel(model)
        loss = _sgd_step(ddp, images[rank * half:(rank + 1) * half])
        torch.save({"state": model.state_dict(), "loss": loss}, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_matches_single_process(tmp_path):
    model = _build()
    with torch.no_grad():  # make the FPN biases non-trivial
        for p in model.fpn.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.1)
    images = torch.randn(BATCH, 3, 64, 80)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    torch.save(images, tmp_path / "images.pt")

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(rank), str(port), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(WORLD_SIZE)]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=180)
            outputs.append(out.decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{outputs[rank][-4000:]}"

    initial = {k: v.clone() for k, v in model.state_dict().items()}
    full_loss = _sgd_step(model, images)
    expected = model.state_dict()
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD_SIZE, full_loss, rtol=1e-5, atol=0)
    moved = 0
    for key, value in expected.items():
        for rank, result in enumerate(results):
            torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, key=key, rank=rank: f"rank {rank}, {key}: {m}")
        moved += not torch.equal(value, initial[key])
    # Both the FPN and the trainable body stages were updated by the step.
    assert not torch.equal(expected["fpn.inner_blocks.0.0.bias"], initial["fpn.inner_blocks.0.0.bias"])
    assert not torch.equal(expected["body.conv1.weight"], initial["body.conv1.weight"])
    assert moved == sum(p.requires_grad for p in model.parameters())


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
