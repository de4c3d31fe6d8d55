"""A site that trains on several processes: PyTorch's DistributedDataParallel inside one site.

A data center with several GPUs is one site with one SuperNode; its node config's
`nproc-per-site = N` makes its ClientApp start N processes for a round's training (torch's
own `start_processes`, spawned), one per GPU with NCCL where the site has N CUDA devices, else
on the CPU with gloo (each process a 1/N share of the cores). The ClientApp stays the one Flower
speaks to: it hands the processes the global model (a safetensors file in a private temporary
folder) and the round's settings, and reads back the trained model and the result rank 0 wrote.

The server's schedule holds exactly: the processes cut the site's data into global batches of
`batch-size` examples, as one process would (one seeded order, the same on every rank), each
taking its slice of every batch, and DDP averages their gradients; so the site takes one
process's optimizer steps at the same learning rates, and reports its whole example count.
Every rank's learning rates are compared before the result is written. DDP averages the ranks'
mean gradients: where `batch-size` does not divide by N (or in an epoch's last batch) the
slices differ by an example and weigh alike, close to but not exactly one process's mean; and
BatchNorm layers keep statistics of their rank's slice, as under any DDP. Under DP-SGD each rank
Poisson-samples its own share of the examples instead (fedcycle.privacy.RankPoisson), at one
process's rate and steps, and Opacus's DDP adds the noise once.

A rank that fails fails the site's round in one line naming the rank (a task's own error stays
the task's, as the site's policy lets it leave); `start_processes` ends the others, and the next
round starts new ones. The ranks exchange nothing but tensors through torch.distributed; what
they report they write as JSON and safetensors to the private folder.
Flower starts a new ClientApp process for every message in a deployment, so the processes
cannot outlive a round there: each round pays their start (measured in docs/bench.md).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import traceback
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException, start_processes
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from fedcycle.errors import ConfigError, TaskError
from fedcycle.files import atomic_write
from fedcycle.privacy import rank_poisson_loader
from fedcycle.site import PROCESSES_KEY, load_site
from fedcycle.trainer import TrainConfig, TrainResult, task_fault, train

# how long a rank waits on its peers in one collective (a lost peer is found by start_processes
# at once; this bounds a peer that hangs)
RANKS_TIMEOUT = timedelta(minutes=30)


class GlobalBatches(Sampler[list[int]]):
    """Rank `rank`'s slice of every global batch: the site's examples in one seeded order (a new
    one every pass), cut into batches of `batch_size` as one process would, each batch shared out
    among the `world` ranks. A last batch smaller than `world` lends its examples again to the
    ranks it cannot fill (no rank steps on an empty batch)."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.generator = torch.Generator().manual_seed(seed)  # the same on every rank: one order

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def examples(self) -> int:
        """How many examples this rank trains on in a pass (its weight in the site's mean loss)."""
        sizes = [min(self.batch_size, self.n - start) for start in range(0, self.n, self.batch_size)]
        return sum(1 if size < self.world else len(range(self.rank, size, self.world)) for size in sizes)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.world:
                yield [batch[self.rank % len(batch)]]
            else:
                yield batch[self.rank::self.world]


def train_on_processes(run_config: Mapping[str, Any], node_config: Mapping[str, Any], state: dict[str, torch.Tensor],
                       cfg: TrainConfig, statistics: Any, processes: int) -> tuple[TrainResult, dict[str, torch.Tensor]]:
    """Train the site's model from `state` on `processes` processes; the result and the trained weights."""
    with tempfile.TemporaryDirectory(prefix="fedcycle-ranks-") as folder:
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(folder) / "start.safetensors"))
        try:
            start_processes(_rank, args=(processes, folder, dict(run_config), dict(node_config), cfg, statistics),
                            nprocs=processes, join=True, start_method="spawn")
        except ProcessRaisedException as err:
            raise _rank_error(Path(folder), err.error_index, processes) from None
        except ProcessExitedException as err:
            raise RuntimeError(f"rank {err.error_index} of {processes} ({PROCESSES_KEY}) died with exit code "
                               f"{err.exit_code}; the others were stopped") from None
        result = json.loads((Path(folder) / "result.json").read_text())
        trained = load_file(str(Path(folder) / "trained.safetensors"))
        return TrainResult(**result), {name: trained[name] for name in state}  # the model's order, not the file's


def _rank_error(folder: Path, rank: int, processes: int) -> Exception:
    """The failure to report: a rank's own error where the task failed (its peers then fail too,
    waiting on it, and may be the one torch names), else the named rank's; as the error it was,
    so that the site's policy and the server judge it as they would on one process."""
    written = {int(p.name.split("-")[1].split(".")[0]): json.loads(p.read_text()) for p in folder.glob("rank-*.error.json")}
    if not written:
        return RuntimeError(f"rank {rank} of {processes} ({PROCESSES_KEY}) failed; the others were stopped")
    rank = next((r for r, e in sorted(written.items()) if e["task_fault"]), rank if rank in written else min(written))
    error = written[rank]
    prefix = f"rank {rank} of {processes} ({PROCESSES_KEY}): "
    hidden = None if error["without_values"] is None else prefix + error["without_values"]
    kind = TaskError if error["task_fault"] else ConfigError if error["config"] else RuntimeError
    failed = kind(prefix + error["line"], **({"without_values": hidden} if kind is not RuntimeError else {}))
    failed.add_note(f"rank {rank}'s traceback:\n{error['traceback']}")  # for the site's log, not the reply
    return failed


def _rank(rank: int, world: int, folder: str, run_config: dict, node_config: dict, cfg: TrainConfig,
          statistics: Any) -> None:
    try:
        site = load_site(run_config, node_config)  # the process's own: its data, task and device
        cuda = site.device.type == "cuda"
        device = torch.device("cuda", (site.device.index or 0) + rank) if cuda else site.device
        if cuda:
            torch.cuda.set_device(device)
        else:  # a share of the cores each, not every process on all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{folder}/rendezvous",
                                rank=rank, world_size=world, timeout=RANKS_TIMEOUT)
        try:
            site.task.use_statistics(statistics)
            model = site.new_model()
            model.load_state_dict(load_file(f"{folder}/start.safetensors"))
            model.to(device)
            if cfg.dp.enabled:  # DP-SGD: Poisson batches of the rank's share, Opacus's DDP (fedcycle.privacy)
                net, examples = model, math.ceil((len(site.train) - rank) / world)
                loader = rank_poisson_loader(site.train, cfg.batch_size, rank, world, cfg.num_workers)
            else:
                net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
                sampler = GlobalBatches(len(site.train), cfg.batch_size, rank, world, cfg.seed)
                loader = DataLoader(site.train, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=cuda,
                                    persistent_workers=cfg.num_workers > 0)
                examples = sampler.examples()
            result = train(site.task, net, site.train, cfg, device, loader=loader)
            share = {"lrs": result.lrs, "loss": result.loss, "metrics": result.metrics, "examples": examples}
            atomic_write(Path(folder) / f"rank-{rank}.json", json.dumps(share).encode())
            dist.barrier()
            if rank == 0:
                shares = [json.loads((Path(folder) / f"rank-{r}.json").read_text()) for r in range(world)]
                _write_result(Path(folder), model, result, shares)
        finally:
            dist.destroy_process_group()
    except BaseException as err:
        # whole or not at all: a peer may be stopped while it writes (start_processes ends the others)
        atomic_write(Path(folder) / f"rank-{rank}.error.json", json.dumps({
            "task_fault": task_fault(err), "config": isinstance(err, ConfigError),
            "line": str(err).splitlines()[0] if str(err) else type(err).__name__,
            "without_values": getattr(err, "without_values", None), "traceback": traceback.format_exc()}).encode())
        raise


def _write_result(folder: Path, model: torch.nn.Module, result: TrainResult, shares: list[dict]) -> None:
    """Rank 0: every rank stepped the same learning rates; the site's loss and metrics are the
    ranks' means weighted by the examples each trained on."""
    for rank, share in enumerate(shares):
        if share["lrs"] != shares[0]["lrs"]:
            raise RuntimeError(f"rank {rank} stepped other learning rates than rank 0 ({len(share['lrs'])} steps "
                               f"against {len(shares[0]['lrs'])}); the ranks must follow one schedule")
    total = sum(share["examples"] for share in shares) or 1
    loss = sum(share["loss"] * share["examples"] for share in shares) / total
    metrics = {k: sum(share["metrics"][k] * share["examples"] for share in shares) / total for k in result.metrics}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(folder / "trained.safetensors"))
    (folder / "result.json").write_text(json.dumps(asdict(replace(result, loss=loss, metrics=metrics))))
