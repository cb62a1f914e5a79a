"""Benchmark: XLA's CPU convolution options for the ResNet-20 training step, against PyTorch.

One run measures the single-copy ResNet-20 training step of jaxcfl
(:meth:`jaxcfl.Lockstep.step_function`, ``copies_mode="unroll"``, one copy: batch 128 of
32x32x3 float32 by default, SGD lr 0.1 with Nesterov momentum 0.9 and weight decay 5e-4,
cross-entropy, BatchNorm in training mode) under several *options* and the same step of the
PyTorch model of ``benchmarks/train_step.py``, and prints each option's images/s and its ratio
to PyTorch's. An option is a set of XLA flags and/or another implementation of the
convolution inside the same network:

``xla-default``      XLA's defaults (``lax.conv_general_dilated``, NHWC / HWIO);
``onednn``           ``--xla_cpu_use_onednn=true``;
``xnnpack``          ``--xla_cpu_use_xnnpack=true``;
``onednn+xnnpack``   both flags;
``no-ynn``           ``--xla_cpu_experimental_ynn_fusion_type=`` (empty list): this jaxlib sends
                     some convolutions (the weight gradients) and reductions to YNNPACK by
                     default; this sends them back to XLA's own (Eigen) kernels;
``im2col``           every convolution as im2col by shifted slices (k*k strided slices of the
                     padded input concatenated along channels) and one matrix product;
``patches``          every convolution as ``lax.conv_general_dilated_patches`` and one matrix
                     product;
``nchw``             every convolution in NCHW / OIHW (``dimension_numbers``), the network
                     staying NHWC (a transpose on each side of every convolution);
``torch``            the PyTorch step (``torch.nn`` model, ``torch.optim.SGD(nesterov=True)``).

XLA reads its flags once, when the backend starts, so every option runs in its own process
(``XLA_FLAGS`` set in the child's environment; ``torch`` too). The children are started and
compiled one after the other and then stay alive; the timed *rounds* visit them in turn (the
order rotates every round, with a 0.2 s pause between visits), so that background load hits
all options alike. Each visit times ``--steps`` training steps, one forward pass, one
forward+backward pass (loss and parameter gradients, no update), and the forward, input-gradient
(dx) and weight-gradient (dw) passes of three of ResNet-20's 3x3 convolutions (16->16 channels
at 32x32, 32->32 at 16x16, 64->64 at 8x8) plus, for jaxcfl, the transpose (N,H,W,C) ->
(C,H,W,N) of such a layer's input on its own (T: the layout change XLA makes for every weight
gradient). Every short item gets an untimed call just before its timed one: the previous
program's worker threads may still be spinning. The figures are medians over the rounds;
compile time (first call minus the median step) is reported apart. The jaxcfl step is the
jitted lockstep step compiled ahead of time (``.lower(...).compile()``: the executable its
first call would build, and its optimised HLO with it). An option whose step takes over 2 s is
timed with 1 step in the first round only, without the forward+backward item. Finally every
other jaxcfl option profiles one step (``jax.profiler``) and sums the time of XLA's thunks by
kind (convolution, transpose, elementwise, reduction, concatenate/slice/pad, dot; with the
library, e.g. ``ynn`` for a YNNPACK fusion), which says where the time goes. Thunk times are
summed over XLA's threads; work a library hands to threads of its own may be missing from them.

The ``bits`` column says whether the option's parameters and batch statistics after the first
step are bit-identical to ``xla-default``'s (``jaxcfl.fingerprint``). An option
that changes them need not be less deterministic, but every trained network's exact numbers
(and fingerprints recorded by earlier runs) change with it.

Run ``python benchmarks/conv_options.py --help``; results are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as _dt
import glob
import gzip
import json
import os
import re
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # train_step.py and _machine.py, also when imported from elsewhere
# An installed jaxcfl (pip install -e '.[bench]') comes first on the path; else this checkout's src/.
sys.path.append(os.path.join(HERE, "..", "src"))

MSG = "CONVOPT "  # prefix of the protocol lines a worker writes on its stdout


@dataclasses.dataclass(frozen=True)
class Option:
    flags: str  # appended to XLA_FLAGS in the child process
    conv: str | None  # a key of CONVS, None: lax.conv_general_dilated as flax calls it
    what: str


OPTIONS: dict[str, Option] = {
    "xla-default": Option("", None, "XLA defaults, lax.conv_general_dilated NHWC/HWIO"),
    "onednn": Option("--xla_cpu_use_onednn=true", None, "oneDNN flag"),
    "xnnpack": Option("--xla_cpu_use_xnnpack=true", None, "XNNPACK flag"),
    "onednn+xnnpack": Option("--xla_cpu_use_onednn=true --xla_cpu_use_xnnpack=true", None, "both flags"),
    "no-ynn": Option("--xla_cpu_experimental_ynn_fusion_type=", None, "YNNPACK fusions off (Eigen convolutions)"),
    "im2col": Option("", "im2col", "k*k shifted slices, concatenate, one matmul"),
    "patches": Option("", "patches", "conv_general_dilated_patches + one matmul"),
    "nchw": Option("", "nchw", "NCHW/OIHW dimension_numbers, transposes around"),
}
TORCH = "torch"
DEFAULT = "xla-default"

SLOW_STEP_S, SLOW_ROUNDS = 2.0, 1  # an option whose step takes longer is timed in fewer rounds

# The micro-benchmark's convolutions: (label, spatial side, in channels, out channels) of ResNet-20, 3x3, stride 1.
LAYERS = (("16ch@32", 32, 16, 16), ("32ch@16", 16, 32, 32), ("64ch@8", 8, 64, 64))
PASSES = ("fwd", "dx", "dw", "T")

_JSON = False  # --json: stdout holds the JSON document only


_T0 = time.perf_counter()


def log(msg: str = "") -> None:
    """A line of the human-readable report (stderr under --json)."""
    print(msg, file=sys.stderr if _JSON else sys.stdout, flush=True)


def stamp() -> str:
    return f"[{time.perf_counter() - _T0:4.0f} s]"


# --- convolution implementations (benchmark only; called as flax calls lax.conv_general_dilated) ---

def _check_plain(padding, lhs_dilation, rhs_dilation, feature_group_count) -> list[tuple[int, int]]:
    if isinstance(padding, str) or any(d not in (None, 1) and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
        raise NotImplementedError("explicit padding, no dilation only")
    if feature_group_count != 1:
        raise NotImplementedError("feature_group_count must be 1")
    return [tuple(p) for p in padding]


def conv_im2col(x, w, strides, padding, *, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                feature_group_count=1, precision=None, **_):
    """NHWC x HWIO: the k*k strided windows of the padded input, concatenated along channels
    in (row, column, channel) order, times the kernel reshaped to (k*k*C, O)."""
    import jax.numpy as jnp
    from jax import lax

    (pt, pb), (pl, pr) = _check_plain(padding, lhs_dilation, rhs_dilation, feature_group_count)
    kh, kw, c, o = w.shape
    sh, sw = strides
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    n, hp, wp, _ = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    cols = [lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return jnp.dot(cols, w.reshape(kh * kw * c, o), precision=precision)


def conv_patches(x, w, strides, padding, *, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                 feature_group_count=1, precision=None, **_):
    """``lax.conv_general_dilated_patches`` (features ordered channel-major: c*k*k + i*k + j) and one matmul."""
    import jax.numpy as jnp
    from jax import lax

    padding = _check_plain(padding, lhs_dilation, rhs_dilation, feature_group_count)
    kh, kw, c, o = w.shape
    cols = lax.conv_general_dilated_patches(x, (kh, kw), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=precision)
    return jnp.dot(cols, w.transpose(2, 0, 1, 3).reshape(c * kh * kw, o), precision=precision)


def conv_nchw(x, w, strides, padding, *, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, precision=None, **_):
    """The same convolution with NCHW / OIHW / NCHW dimension numbers (operands transposed to match)."""
    from jax import lax

    padding = _check_plain(padding, lhs_dilation, rhs_dilation, feature_group_count)
    y = lax.conv_general_dilated(x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), strides, padding,
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=precision)
    return y.transpose(0, 2, 3, 1)


def conv_lax(x, w, strides, padding, *, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
             feature_group_count=1, precision=None, **_):
    """What flax's ``nnx.Conv`` does by default: ``lax.conv_general_dilated`` in NHWC / HWIO."""
    from jax import lax

    return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=feature_group_count, precision=precision)


CONVS: dict[str, Callable] = {"im2col": conv_im2col, "patches": conv_patches, "nchw": conv_nchw}


# --- workers (one process per option) ------------------------------------------------------------

def _data(batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    return x, y


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class JaxWorker:
    """The jaxcfl step of one option, its forward / forward+backward passes and the layer micro-benchmark."""

    def __init__(self, batch: int, conv: str | None, micro: bool):
        import jax
        import jax.numpy as jnp

        from jaxcfl.nn import nets as nets
        from jaxcfl._core.determinism import fingerprint
        from jaxcfl.nn._preset import cross_entropy
        from train_step import JaxSteps

        self.jax = jax
        x, y = _data(batch)
        impl = self.impl = JaxSteps("resnet20", (1.0,), "unroll", x, y, conv=CONVS[conv] if conv else None)
        t0 = time.perf_counter()
        # The jitted step, compiled ahead of time: the same executable as the first call would compile, and
        # its optimised HLO (read by profile()) without compiling it twice.
        compiled = impl.fn.compile(impl.state, impl.x, impl.y)
        self.hlo = compiled.as_text()
        impl.fn = compiled
        self.loss = impl.step()
        self.first_s = time.perf_counter() - t0  # trace + compile + one step
        self.fingerprint = fingerprint((self.impl.state.params, self.impl.state.model_state))
        self.warm_s = _timed(self.impl.step)

        graphdef, state = self.impl.graphdef, self.impl.state
        params, stats = state.copy(0).params, state.copy(0).model_state
        xj, yj = jnp.asarray(x), jnp.asarray(y)

        def loss(p):
            logits, new_stats = nets.apply(graphdef, p, stats, xj, train=True)
            return cross_entropy(logits, yj), new_stats

        fwd, fwdbwd = jax.jit(loss), jax.jit(jax.value_and_grad(loss, has_aux=True))
        self.items: dict[str, Callable[[], object]] = {"forward": lambda: jax.block_until_ready(fwd(params))}
        if self.warm_s <= SLOW_STEP_S:  # a slow option's forward+backward costs as much as its step
            self.items["forward+backward"] = lambda: jax.block_until_ready(fwdbwd(params))
        if micro:
            fn = CONVS[conv] if conv else conv_lax
            for label, side, cin, cout in LAYERS:
                kx, kw, kc = jax.random.split(jax.random.key(0), 3)
                xl = jax.random.normal(kx, (batch, side, side, cin), jnp.float32)
                wl = 0.1 * jax.random.normal(kw, (3, 3, cin, cout), jnp.float32)
                ct = jax.random.normal(kc, (batch, side, side, cout), jnp.float32)
                conv_l = lambda a, b, fn=fn: fn(a, b, (1, 1), [(1, 1), (1, 1)])
                f = jax.jit(conv_l)
                dx = jax.jit(lambda a, b, g, conv_l=conv_l: jax.vjp(conv_l, a, b)[1](g)[0])
                dw = jax.jit(lambda a, b, g, conv_l=conv_l: jax.vjp(conv_l, a, b)[1](g)[1])
                self.items[f"{label} fwd"] = lambda f=f, a=xl, b=wl: jax.block_until_ready(f(a, b))
                self.items[f"{label} dx"] = lambda f=dx, a=xl, b=wl, g=ct: jax.block_until_ready(f(a, b, g))
                self.items[f"{label} dw"] = lambda f=dw, a=xl, b=wl, g=ct: jax.block_until_ready(f(a, b, g))
                # the layout change XLA makes for the weight gradient ((N,H,W,C) -> (C,H,W,N)), on its own
                tr = jax.jit(lambda a: a.transpose(3, 1, 2, 0))
                self.items[f"{label} T"] = lambda f=tr, a=xl: jax.block_until_ready(f(a))
        self.compile_items_s = sum(_timed(item) for item in self.items.values())  # compile + warm-up

    def step(self) -> float:
        return self.impl.step()

    def profile(self) -> dict:
        """Thunk time of one traced step, summed over XLA's threads, by kind of operation."""
        jax = self.jax
        impl = self.impl
        kinds = _thunk_kinds(self.hlo)
        with tempfile.TemporaryDirectory() as tmp:
            jax.profiler.start_trace(tmp, create_perfetto_trace=True)
            wall = _timed(impl.step)
            jax.profiler.stop_trace()
            paths = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "perfetto_trace.json.gz"))
            if not paths:
                return {"error": "no perfetto trace written"}
            with gzip.open(paths[0]) as fh:
                trace = json.load(fh)
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        ms = collections.defaultdict(float)
        count = collections.Counter()
        for e in events:
            if e.get("ph") == "X" and e.get("name") in kinds:
                ms[kinds[e["name"]]] += e.get("dur", 0) / 1e3
                count[kinds[e["name"]]] += 1
        return {"wall_ms": 1e3 * wall, "thunk_ms": dict(ms), "thunks": dict(count), "total_ms": sum(ms.values())}


def _thunk_kinds(hlo: str) -> dict[str, str]:
    """Instruction name -> kind, for the top-level instructions of a compiled HLO module (the thunks)."""
    ops: dict[str, set[str]] = {}
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if head:
            current = "ENTRY" if line.startswith("ENTRY") else head.group(1)
            ops[current] = set()
            continue
        m = re.match(r"\s+(?:ROOT )?%\S+ = \S+ ([\w-]+)\(", line)
        if m and current:
            ops[current].add(m.group(1))
    kinds = {}
    entry = hlo[hlo.find("\nENTRY"):]
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s+(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(", line)
        if not m:
            continue
        name, op = m.groups()
        inner = {op}
        for called in re.findall(r"(?:calls|to_apply)=%([\w.-]+)", line):
            inner |= ops.get(called, set())
        lib = re.search(r'"kind":"__(\w+?)_fusion"', line)
        if op in ("parameter", "constant", "bitcast", "tuple", "get-tuple-element"):
            continue
        if "convolution" in inner:
            kind = "conv"
        elif "dot" in inner:
            kind = "dot"
        elif "transpose" in inner or op == "copy" or name.startswith(("transpose", "copy")):
            kind = "transpose"
        elif inner & {"concatenate", "slice", "pad", "dynamic-slice", "dynamic-update-slice", "gather", "scatter"}:
            kind = "concat/slice/pad"
        elif inner & {"reduce", "reduce-window"}:
            kind = "reduce"
        else:
            kind = "elementwise"
        kinds[name] = kind + (f" ({lib.group(1)})" if lib else "")
    return kinds


class TorchWorker:
    """The PyTorch step of ``train_step.py``, its forward / forward+backward passes and the same layers."""

    def __init__(self, batch: int, micro: bool, threads: int | None):
        import torch
        import torch.nn.functional as F

        from train_step import TorchSteps

        torch.set_num_threads(threads or os.cpu_count() or 1)
        x, y = _data(batch)
        self.impl = TorchSteps("resnet20", 1, x, y)
        t0 = time.perf_counter()
        self.loss = self.impl.step(0)
        self.first_s = time.perf_counter() - t0
        self.warm_s = _timed(lambda: self.impl.step(0))
        model, tx, ty = self.impl.models[0], self.impl.x, self.impl.y

        def forward():
            with torch.no_grad():
                return F.cross_entropy(model(tx), ty).item()

        def forward_backward():
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(tx), ty)
            loss.backward()
            return loss.item()

        self.items: dict[str, Callable[[], object]] = {"forward": forward, "forward+backward": forward_backward}
        if micro:
            gen = torch.Generator().manual_seed(0)
            for label, side, cin, cout in LAYERS:
                xl = torch.randn(batch, cin, side, side, generator=gen)
                wl = 0.1 * torch.randn(cout, cin, 3, 3, generator=gen)
                ct = torch.randn(batch, cout, side, side, generator=gen)

                def back(mask, xl=xl, wl=wl, ct=ct):
                    with torch.no_grad():
                        return torch.ops.aten.convolution_backward(ct, xl, wl, None, [1, 1], [1, 1], [1, 1], False,
                                                                   [0, 0], 1, mask)

                def fwd(xl=xl, wl=wl):
                    with torch.no_grad():
                        return F.conv2d(xl, wl, None, 1, 1)

                self.items[f"{label} fwd"] = fwd
                self.items[f"{label} dx"] = lambda back=back: back([True, False, False])
                self.items[f"{label} dw"] = lambda back=back: back([False, True, False])
        self.compile_items_s = sum(_timed(item) for item in self.items.values())
        self.fingerprint = None

    def step(self) -> float:
        return self.impl.step(0)

    def profile(self) -> dict:
        return {}


def _send(obj: dict) -> None:
    sys.stdout.write(MSG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main(spec: dict) -> None:
    """A child process: build one option, report, then answer ``round`` / ``profile`` / ``quit`` on stdin."""
    try:
        if spec["name"] == TORCH:
            w = TorchWorker(spec["batch"], spec["micro"], spec.get("torch_threads"))
        else:
            w = JaxWorker(spec["batch"], spec["conv"], spec["micro"])
    except Exception as exc:  # reported to the parent, which records the option as failed
        _send({"error": f"{type(exc).__name__}: {exc}"})
        return
    _send({"ready": True, "first_s": w.first_s, "warm_s": w.warm_s, "compile_items_s": w.compile_items_s,
           "fingerprint": w.fingerprint, "loss": w.loss, "xla_flags": os.environ.get("XLA_FLAGS", "")})
    last: dict[str, float] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "round":
            steps = [_timed(w.step) for _ in range(cmd["steps"])]
            items = {}
            for name, item in w.items.items():
                if last.get(name, 0.0) < 1.0:
                    item()  # untimed call first: the previous program's threads may still be spinning
                items[name] = last[name] = _timed(item)
            _send({"steps": steps, "items": items})
        elif cmd["cmd"] == "profile":
            _send(w.profile())
        else:
            break


class Child:
    """A worker process and its pipe."""

    def __init__(self, name: str, option: Option | None, spec: dict):
        env = dict(os.environ)
        if option is not None and option.flags:
            env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), option.flags) if f)
        src = os.path.join(HERE, "..", "src")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env=env, cwd=HERE)

    def ask(self, cmd: dict | None, timeout: float) -> dict:
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    return {"error": f"no answer within {timeout:.0f} s"}
                line = self.proc.stdout.readline()
                if not line:
                    self.stderr.seek(0)
                    tail = self.stderr.read()[-1500:]
                    return {"error": f"worker exited (code {self.proc.poll()}): {tail.strip()}"}
                if line.startswith(MSG):
                    return json.loads(line[len(MSG):])
        finally:
            sel.close()

    def cpu_ticks(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            return 0

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def _other_load(children: list[Child]):
    """``_machine.OtherLoad`` that also counts the workers' CPU time as this benchmark's own."""
    from _machine import OtherLoad

    class WithChildren(OtherLoad):
        def _snap(self):
            total, busy, own = super()._snap()
            return total, busy, own + sum(c.cpu_ticks() for c in children if c.proc.poll() is None)

    return WithChildren()


# --- the run -------------------------------------------------------------------------------------

def run(names: list[str], batch: int, rounds: int, steps: int, micro: bool, profile: bool,
        torch_threads: int | None, options: dict[str, Option]) -> dict:
    children: dict[str, Child] = {}
    ready: dict[str, dict] = {}
    failed: dict[str, str] = {}
    try:
        for name in names:
            option = options.get(name)
            spec = {"name": name, "batch": batch, "conv": option.conv if option else None, "micro": micro,
                    "torch_threads": torch_threads}
            flags = f"XLA_FLAGS+={option.flags!r}" if option and option.flags else ""
            conv = f" conv={option.conv}" if option and option.conv else ""
            log(f"  {stamp()} starting {name:<15} {flags}{conv} ...")
            child = Child(name, option, spec)
            msg = child.ask(None, timeout=900)
            if "error" in msg:
                failed[name] = msg["error"]
                log(f"    {name} FAILED: {msg['error'][-400:]}")
                child.close()
                continue
            children[name], ready[name] = child, msg
            log(f"    {stamp()} ready: first call {msg['first_s']:.1f} s, next {msg['warm_s']:.2f} s, "
                f"loss {msg['loss']:.6f}")

        live = list(children)
        slow = [name for name in live if ready[name]["warm_s"] > SLOW_STEP_S]
        per_round = {name: 1 if name in slow else steps for name in live}
        samples = {name: {"steps": [], "items": collections.defaultdict(list)} for name in live}
        load = _other_load(list(children.values())).start()
        for r in range(rounds):
            order = live[r % len(live):] + live[:r % len(live)] if live else []
            for name in order:
                if name in slow and r >= SLOW_ROUNDS:
                    continue
                msg = children[name].ask({"cmd": "round", "steps": per_round[name]}, timeout=900)
                if "error" in msg:
                    failed[name] = msg["error"]
                    live.remove(name)
                    log(f"    {name} FAILED in round {r + 1}: {msg['error'][-400:]}")
                    continue
                samples[name]["steps"] += msg["steps"]
                for item, t in msg["items"].items():
                    samples[name]["items"][item].append(t)
                time.sleep(0.2)  # let the previous worker's threads go idle
            log(f"  {stamp()} round {r + 1}/{rounds}: " + ", ".join(f"{n} {samples[n]['steps'][-1]:.3f} s" for n in live
                                                       if samples[n]["steps"]))
        other = load.stop()
        profiles = {}
        if profile:
            for name in live:
                if name != TORCH and name not in slow:
                    profiles[name] = children[name].ask({"cmd": "profile"}, timeout=900)
    finally:
        for child in children.values():
            child.close()

    rows = {}
    for name in names:
        if name in failed and name not in samples:
            rows[name] = {"error": failed[name]}
            continue
        ts = samples[name]["steps"]
        if not ts:
            rows[name] = {"error": failed.get(name, "no timed steps")}
            continue
        med = statistics.median(ts)
        option = options.get(name)
        rows[name] = {
            "xla_flags": option.flags if option else None, "conv": option.conv if option else None,
            "what": option.what if option else "PyTorch (torch.nn, NCHW, oneDNN)",
            "time_per_step_s": med, "images_per_s": batch / med, "images_per_s_best": batch / min(ts),
            "step_times_s": ts, "compile_s": max(0.0, ready[name]["first_s"] - med),
            "first_call_s": ready[name]["first_s"], "loss_after_first_step": ready[name]["loss"],
            "fingerprint_after_first_step": ready[name]["fingerprint"],
            "items_ms": {k: 1e3 * statistics.median(v) for k, v in samples[name]["items"].items()},
        }
        if name in failed:
            rows[name]["error"] = failed[name]
        if name in profiles:
            rows[name]["profile"] = profiles[name]
    base = rows.get(DEFAULT, {})
    for name, row in rows.items():
        if "images_per_s" not in row:
            continue
        if TORCH in rows and "images_per_s" in rows[TORCH]:
            row["ratio_vs_torch"] = row["images_per_s"] / rows[TORCH]["images_per_s"]
        if "images_per_s" in base:
            row["ratio_vs_xla_default"] = row["images_per_s"] / base["images_per_s"]
        if name != TORCH and base.get("fingerprint_after_first_step"):
            row["bits_equal_default"] = row["fingerprint_after_first_step"] == base["fingerprint_after_first_step"]
    return {"batch": batch, "rounds": rounds, "steps_per_round": per_round, "slow": slow, "options": rows,
            "other_cpu_load": other}


def format_result(r: dict) -> str:
    rows = r["options"]
    slow = (f"; {', '.join(r['slow'])}: step over {SLOW_STEP_S:.0f} s, so 1 step in round 1 only, "
            "no forward+backward, not profiled") if r["slow"] else ""
    steps = sorted(set(v for k, v in r["steps_per_round"].items() if k not in r["slow"]))
    lines = [f"ResNet-20 training step, batch {r['batch']}, one copy; {r['rounds']} round{'s' * (r['rounds'] != 1)} of "
             f"{'/'.join(map(str, steps))} timed steps per option{slow}",
             f"  {'option':<15} {'images/s':>8} {'best':>7} {'s/step':>7} {'vs torch':>8} {'vs default':>10} "
             f"{'compile s':>9} {'bits':>5}  XLA_FLAGS / conv"]
    for name, row in rows.items():
        if "images_per_s" not in row:
            lines.append(f"  {name:<15} FAILED: {row['error'][-200:]}")
            continue
        bits = {True: "same", False: "diff", None: "-"}[row.get("bits_equal_default")]
        desc = row["xla_flags"] or ""
        desc += (" " if desc else "") + (f"conv={row['conv']}" if row["conv"] else "")
        lines.append(f"  {name:<15} {row['images_per_s']:>8.1f} {row['images_per_s_best']:>7.1f} "
                     f"{row['time_per_step_s']:>7.3f} {row.get('ratio_vs_torch', float('nan')):>8.2f} "
                     f"{row.get('ratio_vs_xla_default', float('nan')):>10.2f} {row['compile_s']:>9.1f} {bits:>5}  "
                     f"{desc or ('(PyTorch)' if name == TORCH else '(defaults)')}")
    items = [k for k in next((row["items_ms"] for row in rows.values() if "items_ms" in row), {})]
    if items:
        lines.append("  breakdown, ms (median over rounds): forward / forward+backward / step; then one 3x3 "
                     "convolution's forward, input gradient (dx), weight gradient (dw) at batch "
                     f"{r['batch']}, and T: the transpose (N,H,W,C) -> (C,H,W,N) of its input alone")
        head = f"  {'option':<15} {'fwd':>6} {'fwd+bwd':>7} {'step':>6}"
        layers = [layer for layer in LAYERS
                  if any(f"{layer[0]} fwd" in row.get("items_ms", {}) for row in rows.values())]
        for label, *_ in layers:
            head += f" | {label + ' fwd/dx/dw/T':>24}"
        lines.append(head)
        for name, row in rows.items():
            if "items_ms" not in row:
                continue
            it = row["items_ms"]
            nan = float("nan")
            line = (f"  {name:<15} {it.get('forward', nan):>6.0f} {it.get('forward+backward', nan):>7.0f} "
                    f"{1e3 * row['time_per_step_s']:>6.0f}")
            for label, *_ in layers:
                vals = [it.get(f"{label} {p}") for p in PASSES]
                cell = "/".join("-" if v is None else f"{v:.1f}" for v in vals)
                line += f" | {cell:>24}"
            lines.append(line)
    prof = {name: row["profile"] for name, row in rows.items() if row.get("profile") and "thunk_ms" in row["profile"]}
    if prof:
        lines.append("  where the time goes: one profiled step; XLA thunk time in ms summed over its threads (share), "
                     "by kind (library: ynn = YNNPACK fusion; none = XLA's own code or Eigen) from the compiled HLO")
        for name, pr in prof.items():
            parts = sorted(pr["thunk_ms"].items(), key=lambda kv: -kv[1])
            lines.append(f"  {name:<15} wall {pr['wall_ms']:.0f} ms, sum {pr['total_ms']:.0f} ms: "
                         + ", ".join(f"{k} {v:.0f} ({100 * v / max(pr['total_ms'], 1e-9):.0f}%)" for k, v in parts
                                     if v >= 0.5))
    if r["other_cpu_load"] is not None:
        lines.append(f"  CPU used by other processes during the rounds: {100 * r['other_cpu_load']:.0f}% of all CPUs"
                     + ("  ** not quiet **" if r["other_cpu_load"] > 0.05 else ""))
    return "\n".join(lines)


def _cpu_isa() -> str:
    """The widest x86 vector extensions in /proc/cpuinfo (the same model name hides different hosts)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return "flags unknown"
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return "ISA " + ("+".join(isa) if isa else "no AVX2")


def main(argv: list[str] | None = None) -> None:
    global _JSON
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="options: " + "; ".join(f"{k}: {v.what}" for k, v in OPTIONS.items())
                                + f"; {TORCH}: the PyTorch step")
    p.add_argument("--options", nargs="+", default=None, metavar="NAME",
                   help=f"options to run (default all: {' '.join([*OPTIONS, TORCH])})")
    p.add_argument("--flags", action="append", default=[], metavar="NAME=XLA_FLAGS",
                   help="an extra option: these XLA flags with the default convolution (repeatable)")
    p.add_argument("--batch", type=int, default=128, help="images per step (default 128)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (default 4)")
    p.add_argument("--steps", type=int, default=2,
                   help="timed steps per option and round (default 2; an option whose step takes over 2 s: "
                        "1 step in round 1 only, and no profile)")
    p.add_argument("--no-micro", action="store_true", help="skip the three-layer convolution micro-benchmark")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled step (where the time goes)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default os.cpu_count())")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: batch 8, 1 round of 1 step, options xla-default, im2col and torch, no micro")
    p.add_argument("--json", action="store_true", help="print a JSON document on stdout (the tables go to stderr)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    _JSON = args.json

    options = dict(OPTIONS)
    for item in args.flags:
        name, sep, flags = item.partition("=")
        if not sep or not name:
            p.error(f"--flags wants NAME=XLA_FLAGS, got {item!r}")
        options[name] = Option(flags, None, f"XLA_FLAGS {flags!r}")
    if args.quick:
        args.batch, args.rounds, args.steps, args.no_micro = 8, 1, 1, True
        args.options = args.options or [DEFAULT, "im2col", TORCH]
    names = args.options or [*OPTIONS, *(k for k in options if k not in OPTIONS), TORCH]
    unknown = [n for n in names if n not in options and n != TORCH]
    if unknown:
        p.error(f"unknown option(s) {unknown}; choose from {[*options, TORCH]}")
    try:
        import torch  # noqa: F401
    except ImportError:
        if TORCH in names:
            p.error("PyTorch is required for the baseline: pip install -e '.[bench]' "
                    "(or leave 'torch' out of --options)")

    from _machine import loadavg, machine_info

    start = time.perf_counter()
    info = machine_info()
    command = " ".join(["python", os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv)))
    log("== jaxcfl conv_options: XLA's CPU convolution options, ResNet-20 training step vs PyTorch ==")
    log(f"date        : {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    log(f"command     : {command}")
    info["cpu_isa"] = _cpu_isa()
    log(f"cpu         : {info['cpu_model']}  (nproc = {info['nproc']}, {info['cpu_isa']}, "
        f"loadavg = {info['loadavg_at_start']})")
    log(f"versions    : python {info['python']}, jax {info['jax']} ({info['jax_backend']}), "
        f"torch {info['torch']} ({args.torch_threads or os.cpu_count()} threads), numpy {info['numpy']}")
    log(f"XLA_FLAGS   : {os.environ.get('XLA_FLAGS', '')!r} (each option's flags are appended in its own process)")
    log("step        : 32x32x3 float32, one copy, cross-entropy, BN in training mode, SGD lr 0.1 Nesterov 0.9 wd 5e-4")
    result = run(names, args.batch, args.rounds, args.steps, not args.no_micro, not args.no_profile,
                 args.torch_threads, options)
    log("")
    log(format_result(result))
    info["loadavg_at_end"] = loadavg()
    seconds = time.perf_counter() - start
    log(f"\nloadavg at end: {info['loadavg_at_end']}; total {seconds:.0f} s")
    if args.json:
        date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        json.dump({"benchmark": "jaxcfl conv_options", "date": date, "command": command, "machine": info,
                   "result": result, "seconds": seconds}, sys.stdout, indent=2)
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()
