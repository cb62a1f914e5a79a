"""Benchmark: training throughput (images/s) of jaxcfl's lockstep step against PyTorch.

Section 4 of Sun et al. (JMLR 25(174) 2024) trains K copies of one network that
differ only in the perturbation factor k of perturbed SGD (Tables 2-4, Figure 2).
jaxcfl trains them in lockstep, in one compiled step (:meth:`jaxcfl.Lockstep.step_function`).
This script measures, for ResNet-20 and VGG-16-BN on 32x32x3 inputs (float32,
batch 128 by default (16 for VGG-16 to keep the default run near 10
minutes on a 2-core CPU), SGD with Nesterov momentum 0.9 and weight decay 5e-4,
cross-entropy, BatchNorm in training mode):

``jaxcfl-vmap``
    the lockstep step of K copies, ``copies_mode="vmap"`` (one batched program;
    each convolution becomes a grouped convolution);
``jaxcfl-unroll``
    the same step with ``copies_mode="unroll"`` (the K copies traced one after
    the other inside one compiled program);
``jaxcfl-separate``
    K calls of the single-copy step (``K = 1``), one per copy;
``torch-separate``
    K separate PyTorch models (``torch.nn``, same architecture: option-B
    shortcuts, BN, ReLU; ``torch.optim.SGD(nesterov=True)``), one step each.

Images/s counts every copy: ``K * batch / time``. The single-model comparison
(1 copy) comes from the same calls: ``batch / median time of one call`` of the
single-copy jaxcfl step and of one torch step. Compile time (first call minus
the steady median) and the warm-up call are not in the throughput.

Run ``python benchmarks/train_step.py --help``; results are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

# An installed jaxcfl (pip install -e '.[bench]') comes first on the path; else this checkout's src/.
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import jax
import jax.numpy as jnp
from _machine import OtherLoad, loadavg, machine_info
from flax import nnx

from jaxcfl.nn import nets as nets
from jaxcfl.nn._lockstep import Lockstep
from jaxcfl.nn._preset import TrainConfig, copies_of, engine_of, init_lockstep

try:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    torch = None

MODELS = ("resnet20", "vgg16", "cnn")
"""Networks both sides build; the default runs the first two (``cnn``: the four-conv VGG of ``jaxcfl variance``)."""
NUM_CLASSES = 10
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


_JSON = False  # --json: stdout holds the JSON document only


def log(msg: str = "") -> None:
    """A line of the human-readable report (stderr under --json)."""
    print(msg, file=sys.stderr if _JSON else sys.stdout, flush=True)


# --- PyTorch models: the same architectures as jaxcfl.nn.nets ---------------------------------

def _conv_bn(cin: int, cout: int, kernel: int, stride: int) -> list:
    return [tnn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), tnn.BatchNorm2d(cout)]


class TorchBlock(tnn.Module if torch is not None else object):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (option B: 1x1 conv stride 2 + BN), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = tnn.Sequential(*_conv_bn(cin, cout, 3, stride), tnn.ReLU(inplace=True), *_conv_bn(cout, cout, 3, 1))
        self.shortcut = tnn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None

    def forward(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.body(x) + skip)


def torch_resnet(depth: int = 20) -> tnn.Module:
    """CIFAR ResNet of depth 6n + 2 (16/32/64 channels), as :class:`jaxcfl.nn.nets.ResNet`."""
    blocks, cin = [], 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range((depth - 2) // 6):
            blocks.append(TorchBlock(cin, width, 2 if stage > 0 and i == 0 else 1))
            cin = width
    return tnn.Sequential(*_conv_bn(3, 16, 3, 1), tnn.ReLU(inplace=True), *blocks,
                          tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(64, NUM_CLASSES))


def torch_vgg(depth: int = 16) -> tnn.Module:
    """VGG-BN, CIFAR variant (conv-BN-ReLU without conv bias, 2x2 max-pools, one linear layer), as :class:`jaxcfl.nn.nets.VGG`."""
    from jaxcfl.nn.nets._vgg import CONFIGS

    layers, cin = [], 3
    for item in CONFIGS[depth]:
        if item == "M":
            layers.append(tnn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            layers += [*_conv_bn(cin, item, 3, 1), tnn.ReLU(inplace=True)]
            cin = item
    return tnn.Sequential(*layers, tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, NUM_CLASSES))


TORCH_MODELS: dict[str, Callable[[], tnn.Module]] = {"resnet20": lambda: torch_resnet(20), "vgg16": lambda: torch_vgg(16),
                                                     "cnn": lambda: torch_vgg(4)}  # cnn: for accelerator_check.py on a CPU


class TorchSteps:
    """K separate torch models and optimisers on ``device``; ``step(i)`` trains model i on the shared batch."""

    def __init__(self, model: str, copies: int, x: np.ndarray, y: np.ndarray, device: str = "cpu"):
        torch.manual_seed(0)
        self.models = [TORCH_MODELS[model]().to(device).train() for _ in range(copies)]
        self.opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
                     for m in self.models]
        self.x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)  # NHWC -> NCHW
        self.y = torch.from_numpy(y.astype(np.int64)).to(device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.models[0].parameters())

    def step(self, i: int) -> float:
        model, opt = self.models[i], self.opts[i]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(self.x), self.y)
        loss.backward()
        opt.step()
        return loss.detach().item()  # waits for the device


# --- jaxcfl steps -------------------------------------------------------------------------

def replace_conv(graphdef: nnx.GraphDef, params, batch_stats, conv: Callable) -> nnx.GraphDef:
    """``graphdef`` with ``conv`` in place of ``lax.conv_general_dilated`` in every ``nnx.Conv``.

    ``conv`` is called as flax calls ``lax.conv_general_dilated`` (NHWC inputs, HWIO kernels);
    ``params`` and ``batch_stats`` are one copy's (unstacked). Used by ``conv_options.py``.
    """
    model = nets.merge(graphdef, params, batch_stats, train=True)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv):
            module.conv_general_dilated = conv
    return nets.split(model)[0]


class JaxSteps:
    """The trainer's compiled step for ``ks`` (one lockstep state) under ``copies_mode``.

    ``conv``: optional replacement for ``lax.conv_general_dilated`` in the network (see :func:`replace_conv`).
    """

    def __init__(self, model: str, ks: tuple[float, ...], mode: str, x: np.ndarray, y: np.ndarray,
                 conv: Callable | None = None):
        config = TrainConfig(model=model, dataset="cifar10", lr=LR, momentum=MOMENTUM, nesterov=True,
                             weight_decay=WEIGHT_DECAY, milestones=())
        engine = engine_of(config, steps_per_epoch=1, in_channels=x.shape[-1], num_classes=NUM_CLASSES,
                           copies_mode=mode)
        copies = copies_of(config, ks, seed=0)
        graphdef, self.state = init_lockstep(config, ks, x.shape[-1], NUM_CLASSES)
        if conv is not None:
            first = self.state.copy(0)
            graphdef = replace_conv(graphdef, first.params, first.model_state, conv)
            module = nets.merge(graphdef, first.params, first.model_state, train=True)
            engine = Lockstep(module, engine.optimizer, copies_mode=mode)
        self.graphdef = graphdef
        self.engine, self.copies = engine, copies
        self.fn = engine.step_function(copies, self.state)
        self.x, self.y = jnp.asarray(x), jnp.asarray(y)
        self.params = nets.count_params(self.state.copy(0).params)
        self._chunk = None

    def step(self) -> float:
        self.state, metrics = self.fn(self.state, self.x, self.y)
        jax.block_until_ready(self.state)
        return float(metrics["loss"][0])

    def chunk(self, steps: int) -> float:
        """``steps`` steps on the batch in one call of the trainer's compiled loop
        (``Lockstep.steps_per_call = steps``, as :meth:`jaxcfl.Lockstep.fit` runs them)."""
        if self._chunk is None or self._chunk[0] != steps:
            engine = dataclasses.replace(self.engine, steps_per_call=steps)
            self._chunk = steps, engine._chunk_function(self.copies, self.state, per_copy_data=False)
        batch = (np.asarray(self.x), np.asarray(self.y))
        self.state, metrics = self._chunk[1](self.state, [batch] * steps, 0)
        jax.block_until_ready(self.state)
        return float(metrics["loss"][steps - 1, 0])


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- one model ----------------------------------------------------------------------------

def random_batch(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's batch: ``batch`` random 32x32x3 float32 images and int32 labels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
    return x, rng.integers(0, NUM_CLASSES, batch).astype(np.int32)


def bench_model(model: str, batch: int, copies: int, repeats: int, modes: tuple[str, ...],
                ks: tuple[float, ...] | None = None, torch_device: str | None = "cpu") -> dict:
    """Compile and warm up every implementation, then ``repeats`` interleaved rounds.

    ``ks``: the copies' perturbation factors (default ``1, 3, 5, ...``; ``copies`` is then
    ``len(ks)``); ``torch_device``: where the PyTorch baseline runs (``None``: no baseline).
    """
    x, y = random_batch(batch)
    ks = tuple(float(2 * i + 1) for i in range(copies)) if ks is None else tuple(ks)  # k = 1, 3, 5, ...
    copies = len(ks)
    load = OtherLoad().start()

    lockstep = {mode: JaxSteps(model, ks, mode, x, y) for mode in modes}
    separate = [JaxSteps(model, (k,), "unroll", x, y) for k in ks]  # one copy: ordinary convolutions
    torch_steps = TorchSteps(model, copies, x, y, torch_device) if torch_device is not None else None
    first = {}
    for mode, impl in lockstep.items():
        log(f"  compiling jaxcfl-{mode} (K = {copies}) ...")
        first[f"jaxcfl-{mode}"] = timed(impl.step)
    log("  compiling the single-copy jaxcfl step ...")
    first["jaxcfl-single"] = timed(separate[0].step)
    for impl in separate[1:]:
        impl.step()  # the others reuse the compiled step: their first call is a warm-up
    for i in range(copies) if torch_steps is not None else ():
        torch_steps.step(i)  # warm-up (oneDNN primitives, allocator)

    times: dict[str, list[float]] = {f"jaxcfl-{m}": [] for m in modes}
    times |= {name: [] for name in ("jaxcfl-separate", "torch-separate", "jaxcfl-single", "torch-single")
              if torch_steps is not None or not name.startswith("torch")}
    for r in range(repeats):
        for mode, impl in lockstep.items():
            times[f"jaxcfl-{mode}"].append(timed(impl.step))
        single = [timed(impl.step) for impl in separate]
        times["jaxcfl-separate"].append(sum(single))
        times["jaxcfl-single"] += single
        if torch_steps is not None:
            single = [timed(lambda i=i: torch_steps.step(i)) for i in range(copies)]
            times["torch-separate"].append(sum(single))
            times["torch-single"] += single
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{name} {t[-1]:.2f} s" for name, t in times.items()
                                                      if not name.endswith("single")))
    other = load.stop()

    rows = {}
    for name, ts in times.items():
        images = batch * (1 if name.endswith("single") else copies)
        med = statistics.median(ts)
        rows[name] = {"copies": 1 if name.endswith("single") else copies, "time_per_call_s": med,
                      "images_per_s": images / med, "images_per_s_best": images / min(ts), "times_s": ts}
        if name in first:
            rows[name]["compile_s"] = max(0.0, first[name] - med)
    ips = {name: row["images_per_s"] for name, row in rows.items()}
    ratios = {}
    if torch_steps is not None:
        ratios = {f"{name} / torch-separate": ips[name] / ips["torch-separate"]
                  for name in ips if name.startswith("jaxcfl") and not name.endswith("single")}
        ratios["jaxcfl-single / torch-single"] = ips["jaxcfl-single"] / ips["torch-single"]
    if "vmap" in modes and "unroll" in modes:
        ratios["jaxcfl-vmap / jaxcfl-unroll"] = ips["jaxcfl-vmap"] / ips["jaxcfl-unroll"]
    for mode in modes:
        ratios[f"jaxcfl-{mode} / jaxcfl-separate"] = ips[f"jaxcfl-{mode}"] / ips["jaxcfl-separate"]
    return {"model": model, "batch": batch, "copies": copies, "ks": list(ks), "repeats": repeats,
            "params_jaxcfl": separate[0].params, "params_torch": torch_steps.num_params() if torch_steps is not None else None,
            "impls": rows, "ratios": ratios, "other_cpu_load": other}


def format_result(r: dict) -> str:
    lines = [f"{r['model']}  batch {r['batch']}, K = {r['copies']} copies (k = {r['ks']}), {r['repeats']} timed rounds; "
             f"parameters: jaxcfl {r['params_jaxcfl']:,}, torch {r['params_torch']:,}",
             f"  {'implementation':<17} {'copies':>6} {'images/s':>9} {'best':>9} {'s/call':>8} {'compile s':>9}"]
    for name, row in r["impls"].items():
        comp = f"{row['compile_s']:.1f}" if "compile_s" in row else "-"
        lines.append(f"  {name:<17} {row['copies']:>6} {row['images_per_s']:>9.1f} {row['images_per_s_best']:>9.1f} "
                     f"{row['time_per_call_s']:>8.2f} {comp:>9}")
    lines.append("  ratios (images/s): " + "; ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))
    if r["other_cpu_load"] is not None:
        lines.append(f"  CPU used by other processes meanwhile: {100 * r['other_cpu_load']:.0f}% of all CPUs"
                     + ("  ** not quiet **" if r["other_cpu_load"] > 0.05 else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    global _JSON
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS[:2]), help="default: resnet20 vgg16")
    p.add_argument("--batch", type=int, default=None,
                   help="images per step and copy (default 128; 16 for vgg16, whose single jaxcfl step at 128 "
                        "takes about a minute on a loaded 2-core CPU)")
    p.add_argument("--copies", type=int, default=3, help="K, copies trained (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per model (default: 2 resnet20, 1 vgg16)")
    p.add_argument("--modes", nargs="+", choices=("vmap", "unroll"), default=["vmap", "unroll"],
                   help="copies_mode of the lockstep step (default both)")
    p.add_argument("--quick", action="store_true", help="smoke test: resnet20 only, batch 16, K = 2, 1 round")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default os.cpu_count())")
    p.add_argument("--json", action="store_true", help="print a JSON document on stdout (the tables go to stderr)")
    args = p.parse_args(argv)
    _JSON = args.json
    if torch is None:
        p.error("PyTorch is required for the baseline: pip install -e '.[bench]'")
    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    if args.quick:
        args.models, args.batch, args.copies, args.repeats = ["resnet20"], args.batch or 16, 2, args.repeats or 1

    start = time.perf_counter()
    info = machine_info()
    command = " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])
    log("== jaxcfl training-step benchmark: lockstep perturbed copies vs PyTorch ==")
    log(f"date        : {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    log(f"command     : {command}")
    log(f"cpu         : {info['cpu_model']}  (nproc = {info['nproc']}, loadavg = {info['loadavg_at_start']})")
    log(f"versions    : python {info['python']}, jax {info['jax']} ({info['jax_backend']}), "
        f"torch {info['torch']} ({info['torch_threads']} threads), numpy {info['numpy']}")
    log("step        : 32x32x3 float32, cross-entropy, BN in training mode, SGD lr 0.1 Nesterov 0.9 wd 5e-4 "
        "(jaxcfl: perturbed SGD with k = 1, 3, 5, ...)")
    log("columns     : images/s = copies x batch / median s per call; best = from the fastest call; "
        "compile = first call - median")

    results = []
    for model in args.models:
        batch = args.batch or (16 if model == "vgg16" else 128)
        repeats = args.repeats or (1 if model == "vgg16" else 2)
        log(f"\n-- {model}, batch {batch}, K = {args.copies} ...")
        r = bench_model(model, batch, args.copies, repeats, tuple(args.modes))
        results.append(r)
        log(format_result(r))
    info["loadavg_at_end"] = loadavg()
    seconds = time.perf_counter() - start
    log(f"\nloadavg at end: {info['loadavg_at_end']}; total {seconds:.0f} s")
    if args.json:
        json.dump({"benchmark": "jaxcfl train_step", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   "command": command, "machine": info, "results": results, "seconds": seconds}, sys.stdout, indent=2)
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()
