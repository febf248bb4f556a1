"""Peak memory of a training step, estimated by tracing it on fake tensors (no GPU, no weights).

A step runs under ``torch._subclasses.fake_tensor.FakeTensorMode``: every tensor has its shape,
dtype, strides and device (``cuda`` included, on a machine without a GPU) but no data, and every op
computes only its outputs' metadata. fastft's own kernels are ``torch.library`` custom ops with
fake implementations (the Triton launchers in ``kernels/``, bound by ``fastft/ops/triton_backend.py``;
the C++ ops in ``fastft/ops/cpp.py``), so the step follows the same Python code as on the device:
the dispatcher sees ``cuda`` tensors and picks the CUDA backends (Triton attention, the lean
dequantize + cuBLAS LoRA node, ...), the autograd Functions save what they save for real, gradient
checkpointing recomputes in backward, the optimizer allocates its state.

``LiveBytes`` (a ``TorchDispatchMode`` above the fake mode) sees every op's outputs: each new
storage is counted once (views and in-place results share it) and uncounted by a weakref finalizer
when the storage dies -- i.e. what a caching allocator's ``memory_allocated`` counts, without its
512-byte rounding. The peak of that count over a step is the estimate of
``torch.cuda.max_memory_allocated``. Not seen: scratch a kernel allocates and frees inside its own
launch (a fake returns only outputs), the CUDA context and cuBLAS workspaces (outside
``memory_allocated``), and the caching allocator's fragmentation (``memory_reserved`` minus
allocated). docs/memory.md has the method and its validation against measured CPU peaks.

Host synchronisations cannot be traced (a fake tensor has no value): a step that reads a device
value on the host fails here with torch's DataDependentOutputException, which makes the trace
a check that the step has none.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import weakref

SHIM_ENV = "FASTFT_FAKE_CUDA_SHIM"
if __name__ == "__main__" and os.environ.get(SHIM_ENV):
    # The traced child of ``run_traced``: the fake-CUDA shim must be loaded before torch is
    # imported (torch reads its CUDA hooks once, at first use).
    import ctypes
    import importlib.util

    _lib = os.path.join(os.path.dirname(importlib.util.find_spec("torch").origin), "lib")
    for _n in ("libc10.so", "libtorch_cpu.so"):
        ctypes.CDLL(os.path.join(_lib, _n), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(os.environ[SHIM_ENV], mode=ctypes.RTLD_GLOBAL)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

GiB = float(2 ** 30)


_aten = torch.ops.aten
_RNG_FILLS = {_aten.uniform_, _aten.normal_, _aten.bernoulli_, _aten.exponential_, _aten.random_, _aten.geometric_,
              _aten.cauchy_, _aten.log_normal_}


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storage per device type, their peak, and the fastft ops that ran.

    ``live`` / ``peak``: dicts device type -> bytes; ``ops``: Counter of ``fastft::`` op names;
    ``reset_peak()`` starts a new peak from the current live bytes."""

    def __init__(self):
        super().__init__()
        self.live: dict[str, int] = collections.defaultdict(int)
        self.peak: dict[str, int] = collections.defaultdict(int)
        self.ops: collections.Counter = collections.Counter()
        self._sizes: dict[int, tuple[str, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _RNG_FILLS:
            # In-place random fills (parameter initialisation) change values only, which a fake
            # tensor does not have; fake CUDA tensors also have no generator to draw from.
            return args[0]
        out = func(*args, **(kwargs or {}))
        if func.namespace == "fastft" or func is _aten._scaled_dot_product_flash_attention.default:
            self.ops[func._schema.name.split("::", 1)[1]] += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._sizes:
            return
        dev, n = t.device.type, st.nbytes()
        self._sizes[key] = (dev, n)
        self.live[dev] += n
        if self.live[dev] > self.peak[dev]:
            self.peak[dev] = self.live[dev]
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        dev, n = self._sizes.pop(key)
        self.live[dev] -= n

    def reset_peak(self) -> None:
        for d in list(self.live):
            self.peak[d] = self.live[d]


# Fake CUDA tensors on a CPU-only PyTorch build. Python indexing (``t[a:b]``) and ``.to("cuda")``
# of a fake CUDA tensor ask for the CUDA device guard, and the autograd engine asks for the CUDA
# hooks (streams of accelerator tensors); a CPU-only build has neither. This shim supplies both --
# one device, its default stream, setters and events that do nothing, ``hasCUDA() == true`` -- and
# registers them only where nothing is registered: never on a CUDA build, which needs no shim.
# It is loaded before torch is imported, in a child process (``run_traced``), so nothing else in a
# user's process sees it. ``torch.cuda.is_available()`` stays False there.
_FAKE_CUDA_SHIM = r"""
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
namespace {
using namespace c10;
struct FakeCudaGuard final : impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device) const override { return Device(DeviceType::CUDA, 0); }
  Device getDevice() const override { return Device(DeviceType::CUDA, 0); }
  void setDevice(Device) const override {}
  void uncheckedSetDevice(Device) const noexcept override {}
  Stream getStream(Device d) const override { return Stream(Stream::DEFAULT, d); }
  Stream exchangeStream(Stream s) const override { return s; }
  DeviceIndex deviceCount() const noexcept override { return 1; }
  void destroyEvent(void*, const DeviceIndex) const noexcept override {}
  void record(void**, const Stream&, const DeviceIndex, const EventFlag) const override {}
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  bool queryStream(const Stream&) const override { return true; }
  void synchronizeStream(const Stream&) const override {}
  void synchronizeEvent(void*) const override {}
  void recordDataPtrOnStream(const DataPtr&, const Stream&) const override {}
};
struct RegisterGuard {
  RegisterGuard() {
    auto& slot = impl::device_guard_impl_registry[static_cast<size_t>(DeviceType::CUDA)];
    static FakeCudaGuard guard;
    const impl::DeviceGuardImplInterface* none = nullptr;
    slot.compare_exchange_strong(none, &guard);
  }
} register_guard;
}  // namespace
namespace at {
struct FakeCUDAHooks : CUDAHooksInterface {
  FakeCUDAHooks(CUDAHooksArgs) {}
  void init() const override {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  DeviceIndex deviceCount() const override { return 1; }
  DeviceIndex current_device() const override { return 0; }
  int getNumGPUs() const override { return 1; }
};
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", FakeCUDAHooks)
}  // namespace at
"""


def fake_cuda_in_process() -> bool:
    """Whether this process can trace fake CUDA tensors: a CUDA build of torch, or the shim loaded."""
    return torch.version.cuda is not None or bool(os.environ.get(SHIM_ENV)) and __name__ == "__main__"


def fake_cuda_shim() -> str:
    """The path of the compiled shim (built once per torch version, ~20 s, under the temp dir)."""
    import tempfile

    from torch.utils import cpp_extension

    d = os.path.join(tempfile.gettempdir(), "fastft_fake_cuda_" + torch.__version__.replace("+", "_"))
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, "fake_cuda_shim.cpp")
    so = os.path.join(d, "fastft_fake_cuda_shim.so")
    if os.path.exists(so) and os.path.exists(src) and open(src).read() == _FAKE_CUDA_SHIM:
        return so
    with open(src, "w") as f:
        f.write(_FAKE_CUDA_SHIM)
    cpp_extension.load("fastft_fake_cuda_shim", [src], build_directory=d, is_python_module=False, verbose=False)
    return so


def run_traced(spec, timeout: float = 600.0):
    """``estimate(spec)`` in a child process (with the fake-CUDA shim where torch has no CUDA);
    returns its result dict (an "error" key if the trace failed). ``spec`` may be a list of specs
    (one child traces them in turn; a list of results comes back)."""
    specs = spec if isinstance(spec, list) else [spec]
    env = dict(os.environ)
    if any(s.get("device", "cuda").startswith("cuda") for s in specs) and torch.version.cuda is None:
        env[SHIM_ENV] = fake_cuda_shim()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-m", "fastft.memory", json.dumps(specs)], env=env, capture_output=True,
                       text=True, timeout=timeout)
    out = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or len(out) < len(specs):
        err = {"error": ((r.stderr or r.stdout).strip().splitlines() or [f"exit {r.returncode}"])[-1],
               "stderr_tail": r.stderr[-3000:]}
        out += [{**s, **err} for s in specs[len(out):]]
    return out if isinstance(spec, list) else out[0]


@contextlib.contextmanager
def fake_trace():
    """``with fake_trace() as mem:`` -- fake tensors (``cuda`` ones too, without a GPU) with a
    ``LiveBytes`` tracker on top; tensors made inside are fake, and counted from their creation."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastft.quant import codebooks

    # Process-wide caches of real CPU tensors are filled here, outside the fake mode (filled inside,
    # they would keep fake tensors); real inputs (such constants) are converted to fake ones.
    codebooks.nf4_code(), codebooks.dynamic_map(True), codebooks.dynamic_map(False)
    mem = LiveBytes()
    # Module.to() between fake devices: new parameters (a fake tensor cannot swap with another's impl).
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), mem:
            yield mem
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def native_model(name, *, quantization: str | None = "nf4", dtype=torch.bfloat16, device="cuda",
                 r: int = 16, alpha: int = 32, checkpointing: bool = True, blocksize: int = 64,
                 double_quant: bool = True, offload: bool = False, tile_tokens: int | None = None,
                 host_frozen: bool = False):
    """fastft's native causal LM of shape ``name`` (``fastft.models.synthetic.SHAPES`` or a config)
    with uninitialised weights: the frozen ones in ``dtype``, the transformer blocks' linears as
    ``QuantLinear`` (NF4 layout, ``quantization="nf4"``) or dense; LoRA r / alpha on all linear
    layers; gradient checkpointing per decoder layer (``offload``: the saved layer inputs in host
    memory); ``tile_tokens``: the tiled MLP (``tiled_mlp_enable``); ``host_frozen``: the frozen embedding
    and LM head in host memory (``fastft.nn.offload_frozen_to_host``); in training mode. Call it inside
    ``fake_trace()`` for a model of any size (nothing is allocated), or on a real device."""
    import fastft
    from fastft.models.loader import ARCHITECTURES, model_class
    from fastft.models.synthetic import make_config
    from fastft.nn import QuantLinear
    from fastft.quant import NF4Weight

    if quantization not in (None, "nf4"):
        raise ValueError(f"native_model: quantization must be None or 'nf4', got {quantization!r}")
    config = make_config(name)
    cls = model_class(ARCHITECTURES[config.model_type][0])
    with torch.device("meta"):
        model = cls(config)
    targets = list(cls.quant_targets(config)) if quantization else []
    if quantization:  # 4-bit layers replace their meta linears before anything is allocated
        for path in targets:
            lin = model.get_submodule(path)
            parent, _, child = path.rpartition(".")
            qw = NF4Weight.empty((lin.out_features, lin.in_features), blocksize, double_quant, dtype, device=device)
            q = QuantLinear(qw, None)
            if lin.bias is not None:
                q.bias = nn.Parameter(torch.empty(lin.out_features, dtype=dtype, device=device), requires_grad=False)
            setattr(model.get_submodule(parent) if parent else model, child, q)
    _materialize(model, device, dtype)
    model.init_buffers(device)
    model.tie_weights()
    if checkpointing:
        model.gradient_checkpointing_enable(offload=offload)
    if tile_tokens:
        model.tiled_mlp_enable(tile_tokens)
    model = fastft.get_peft_model(model, fastft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                           target_modules="all-linear"))
    if host_frozen:
        from fastft.nn.offload import offload_frozen_to_host

        offload_frozen_to_host(model)
    model.train()
    return model


def _materialize(model: nn.Module, device, dtype) -> None:
    """Every meta parameter becomes an uninitialised frozen one on ``device`` (floating ones in
    ``dtype``), every meta buffer an uninitialised one (tied parameters stay tied). Module.to_empty
    cannot do it under a fake mode (a meta tensor does not swap with a fake one)."""
    new: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in new:
                dt = dtype if p.is_floating_point() else p.dtype
                new[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dt, device=device), requires_grad=False)
            mod._parameters[name] = new[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "meta":
                mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


class _MatMul4bitEmulation(torch.autograd.Function):
    """bitsandbytes' ``MatMul4Bit`` as memory sees it: forward dequantizes W (N, K) into the compute
    dtype, multiplies, drops it; nothing is saved but the packed weight (an input that lives anyway);
    backward dequantizes again for dX. The dequantized copy is an uninitialised tensor of the same
    size and dtype (a trace has no values)."""

    @staticmethod
    def forward(ctx, x, packed, out_features, in_features, bias):
        w = torch.empty((out_features, in_features), dtype=x.dtype, device=x.device)
        y = torch.nn.functional.linear(x, w, bias)
        ctx.wshape, ctx.has_bias = (out_features, in_features), bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        w = torch.empty(ctx.wshape, dtype=dy.dtype, device=dy.device)
        dx = torch.matmul(dy, w)
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias else None
        return dx, None, None, None, db


class Linear4bitEmulation(nn.Linear):
    """The memory of bitsandbytes' ``Linear4bit`` (NF4, blocksize 64, double quantization): packed
    uint8 ((N*K+1)//2, 1) as ``weight``, uint8 block codes (one per 64 weights), fp32 nested absmax
    (one per 256 blocks), the two codebooks; ``forward`` casts x to ``compute_dtype`` and runs
    ``_MatMul4bitEmulation``, as ``Linear4bit.forward`` runs ``bnb.matmul_4bit``. A ``nn.Linear``
    subclass with ``compute_dtype``, so PEFT wraps it as it wraps ``Linear4bit`` (adapters cast to
    the compute dtype). Used where bitsandbytes cannot run (fake tensors: its ``Params4bit``
    is a tensor subclass that cannot wrap a fake tensor)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype, device):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        n = in_features * out_features
        nblocks = -(-n // 64)
        self.weight = nn.Parameter(torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device), requires_grad=False)
        self.register_buffer("absmax", torch.empty(nblocks, dtype=torch.uint8, device=device))
        self.register_buffer("nested_absmax", torch.empty(-(-nblocks // 256), dtype=torch.float32, device=device))
        self.register_buffer("quant_map", torch.empty(16, dtype=torch.float32, device=device))
        self.register_buffer("nested_quant_map", torch.empty(256, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)
        self.compute_dtype = compute_dtype

    def forward(self, x):
        dt = x.dtype
        y = _MatMul4bitEmulation.apply(x.to(self.compute_dtype), self.weight, self.out_features, self.in_features,
                                       self.bias)
        return y.to(dt)


@contextlib.contextmanager
def _fake_module_moves():
    """Inside: ``Module.to(device, dtype)`` replaces each parameter / buffer that changes by a new
    one (floating ones cast to ``dtype``), instead of swapping tensors, which the fake mode's weak
    memo of its tensors forbids."""
    to = nn.Module.to

    def same(a: torch.device, b: torch.device) -> bool:
        return a.type == b.type and (a.index or 0) == (b.index or 0)

    def convert(t, device, dtype):
        dt = dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else t.dtype
        dv = device if device is not None else t.device
        return None if t.dtype == dt and same(t.device, torch.device(dv)) else t.detach().to(dv, dt)

    def fake_to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        for m in self.modules():
            for k, p in list(m._parameters.items()):
                if p is not None and (n := convert(p, device, dtype)) is not None:
                    m._parameters[k] = nn.Parameter(n, requires_grad=p.requires_grad)
            for k, b in list(m._buffers.items()):
                if b is not None and (n := convert(b, device, dtype)) is not None:
                    m._buffers[k] = n
        return self

    nn.Module.to = fake_to
    try:
        yield
    finally:
        nn.Module.to = to


@contextlib.contextmanager
def _flash_sdpa_on_fake_cuda():
    """Inside: ``F.scaled_dot_product_attention`` without a mask on CUDA tensors runs torch's
    FlashAttention op (O(T) memory), as it does on an H100 / H200 for bf16 / fp16 training calls.
    torch picks the kernel by asking the device (a dispatch stub, not an op); a fake GPU cannot
    answer, and the fallback would be the math kernel with its (T x T) scores."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is None and query.device.type == "cuda":
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                      False, scale=scale)[0]
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    # transformers builds an explicit (T x T) causal mask instead of is_causal=True when it sees a
    # fake tensor (it takes it for torch.compile tracing); on a GPU, for the traced batches (no
    # padding, positions 0..T-1: not packed -- found there by reading the positions back), it
    # passes no mask. These two answers are what it computes on a GPU for such a batch.
    from transformers import masking_utils

    saved = masking_utils.is_tracing, masking_utils.find_packed_sequence_indices
    torch.nn.functional.scaled_dot_product_attention = flash
    masking_utils.is_tracing = lambda tensor=None: False
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        masking_utils.is_tracing, masking_utils.find_packed_sequence_indices = saved


def hf_peft_model(name, *, quantization: str | None = "nf4", dtype=torch.bfloat16, device="cuda", r: int = 16,
                  alpha: int = 32, checkpointing: bool = True, compute_dtype=torch.bfloat16):
    """transformers' causal LM of shape ``name`` (SDPA attention) + PEFT LoRA r / alpha on all
    linear layers, the transformer blocks' linears as ``Linear4bitEmulation`` (``quantization="nf4"``,
    bitsandbytes' memory) or dense; non-reentrant gradient checkpointing (as
    ``benchmarks/bench_step.py``'s baseline); uninitialised weights, in training mode."""
    import peft
    import transformers

    from fastft.models.llama import LlamaForCausalLM
    from fastft.models.synthetic import make_config

    cfg = make_config(name)
    cfg.use_cache = False
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    if quantization:
        if quantization != "nf4":
            raise ValueError(f"hf_peft_model: quantization must be None or 'nf4', got {quantization!r}")
        for path in LlamaForCausalLM.quant_targets(cfg):
            lin = model.get_submodule(path)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    Linear4bitEmulation(lin.in_features, lin.out_features, lin.bias is not None, compute_dtype, device))
    _materialize(model, device, dtype)
    if hasattr(model, "tie_weights"):
        try:
            model.tie_weights()
        except TypeError:
            pass
    if checkpointing:
        kw = {"use_reentrant": False}
        fn = getattr(model, "activation_checkpointing_enable", None)
        if fn is not None:
            fn(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    # PEFT casts the adapters to the base layer's compute dtype (bitsandbytes' compute_dtype: bf16).
    with torch.device(device), _fake_module_moves():
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    return model


def train_steps(model, *, batch: int, seq: int, steps: int = 2, autocast: torch.dtype | None = torch.bfloat16,
                mem: LiveBytes | None = None, lr: float = 1e-4, **forward_kw) -> list[float]:
    """``steps`` training steps (forward with labels, backward, AdamW over the trainable
    parameters, zero_grad(set_to_none)) on random token ids; returns each step's peak device bytes
    when ``mem`` is given (the first step has no optimizer state yet; later ones do)."""
    dev = next(p for p in model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr)
    peaks = []
    for _ in range(steps):
        if mem is not None:
            mem.reset_peak()
        ids = torch.zeros((batch, seq), dtype=torch.long, device=dev)  # token values do not move memory
        with torch.autocast(dev.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=ids, **forward_kw).loss
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)
        del ids
        if mem is not None:
            peaks.append(mem.peak[dev.type])
    return peaks


STACKS = ("fastft", "hf")


def estimate(spec: dict) -> dict:
    """Trace ``spec`` in this process: {"stack": "fastft" | "hf", "model": shape name, "batch",
    "seq", "quant": "nf4" | None, "device": "cuda" | "cpu", "dtype": frozen weights' dtype name,
    "autocast": bool (bf16 autocast), "steps", "r", "env": environment variables set for the trace,
    e.g. {"FASTFT_BACKEND": "triton"}}. Returns the spec plus "peak_bytes" (the
    largest step peak), "weights_bytes" (live after building: frozen weights, adapters, buffers),
    "step_peaks" and "ops" (fastft custom ops that ran, with counts)."""
    env = {k: os.environ.get(k) for k in spec.get("env", {})}
    os.environ.update(spec.get("env", {}))
    try:
        return _estimate(spec)
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _estimate(spec: dict) -> dict:
    stack = spec.get("stack", "fastft")
    if stack not in STACKS:
        raise ValueError(f"estimate: stack must be one of {STACKS}, got {stack!r}")
    device = spec.get("device", "cuda")
    dtype = getattr(torch, spec.get("dtype", "bfloat16"))
    autocast = torch.bfloat16 if spec.get("autocast", True) else None
    build = native_model if stack == "fastft" else hf_peft_model
    lean = {k: spec[k] for k in ("offload", "tile_tokens", "host_frozen") if spec.get(k)}
    if lean and stack != "fastft":
        raise ValueError(f"estimate: {sorted(lean)} are fastft options (stack {stack!r})")
    from fastft.ops import loss as _loss

    ce_budget = _loss.CE_CHUNK_BYTES_GPU
    if spec.get("ce_chunk_bytes"):
        _loss.CE_CHUNK_BYTES_GPU = int(spec["ce_chunk_bytes"])
    try:
        with fake_trace() as mem:
            model = build(spec["model"], quantization=spec.get("quant", "nf4"), dtype=dtype, device=device,
                          r=int(spec.get("r", 16)), checkpointing=bool(spec.get("checkpointing", True)), **lean)
            dev_type = torch.device(device).type
            weights = mem.live[dev_type]
            kw = {"use_cache": False} if stack == "hf" else {}
            with _flash_sdpa_on_fake_cuda() if stack == "hf" else contextlib.nullcontext():
                peaks = train_steps(model, batch=int(spec.get("batch", 1)), seq=int(spec["seq"]),
                                    steps=int(spec.get("steps", 2)), autocast=autocast, mem=mem, **kw)
            del model
    finally:
        _loss.CE_CHUNK_BYTES_GPU = ce_budget
    return {**spec, "peak_bytes": max(peaks), "weights_bytes": weights, "step_peaks": peaks, "ops": dict(mem.ops)}


def longest_seq(spec: dict, budget_bytes: float, *, start: int = 8192, quantum: int = 1024, max_traces: int = 8,
                second: int | None = None) -> dict:
    """The longest sequence (a multiple of ``quantum``) whose traced peak fits ``budget_bytes``:
    secant steps on traced peaks (the peak grows about linearly in the sequence length here), each
    candidate traced, until a fitting length and one ``quantum`` longer that does not fit bracket
    it. ``second``: the second length traced (default 4 x ``start``; a guess near the answer saves
    traces of very long sequences). Returns {"fits": seq, "fits_peak_bytes", "exceeds": seq or None,
    "traces": [(seq, peak), ...]}."""
    traces: list[tuple[int, int]] = []

    def peak(seq: int) -> int:
        p = estimate({**spec, "seq": seq})["peak_bytes"]
        traces.append((seq, p))
        return p

    def q(x: float) -> int:
        return max(quantum, int(x) // quantum * quantum)

    a, pa = start, peak(start)
    if pa > budget_bytes:
        return {"fits": None, "exceeds": start, "traces": traces}
    b = q(second if second else start * 4)
    pb = peak(b)
    fit, over = (a, pa), None
    if pb <= budget_bytes:
        fit = (b, pb)
    else:
        over = (b, pb)
    while len(traces) < max_traces:
        if over is not None and over[0] - fit[0] <= quantum:
            break
        (x0, y0), (x1, y1) = (fit, over) if over is not None else ((a, pa), fit)
        slope = (y1 - y0) / max(1, x1 - x0)
        guess = q(x0 + (budget_bytes - y0) / slope) if slope > 0 else q(x1 * 2)
        if over is not None:
            guess = min(max(guess, fit[0] + quantum), over[0] - quantum)
        if guess == fit[0]:
            guess += quantum
        pg = peak(guess)
        if pg <= budget_bytes:
            fit = (guess, pg)
        else:
            over = (guess, pg)
        if over is not None and over[0] - fit[0] > quantum and pg <= budget_bytes and len(traces) < max_traces:
            # check the length one quantum up, so the bracket closes
            up = fit[0] + quantum
            pu = peak(up)
            if pu <= budget_bytes:
                fit = (up, pu)
            else:
                over = (up, pu)
    return {"fits": fit[0], "fits_peak_bytes": fit[1], "exceeds": None if over is None else over[0],
            "exceeds_peak_bytes": None if over is None else over[1], "traces": traces}


def estimate_anywhere(spec: dict, timeout: float = 600.0) -> dict:
    """``estimate(spec)`` here when this process can trace the spec's device, else in a child."""
    if not spec.get("device", "cuda").startswith("cuda") or fake_cuda_in_process():
        return estimate(spec)
    return run_traced(spec, timeout)


if __name__ == "__main__":
    for _spec in json.loads(sys.argv[1]):
        if "longest_within_bytes" in _spec:
            _search = {k: _spec[k] for k in ("start", "second", "quantum", "max_traces") if k in _spec}
            _res = longest_seq({k: v for k, v in _spec.items() if k != "longest_within_bytes" and k not in _search},
                               float(_spec["longest_within_bytes"]), **_search)
            print(json.dumps({**_spec, **_res}), flush=True)
        else:
            print(json.dumps(estimate(_spec)), flush=True)


__all__ = ["GiB", "Linear4bitEmulation", "LiveBytes", "STACKS", "estimate", "estimate_anywhere", "fake_cuda_shim",
           "fake_trace", "hf_peft_model", "longest_seq", "native_model", "run_traced", "train_steps"]
