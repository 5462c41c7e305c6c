"""What a compiled module does per step, read from its optimized HLO text.

XLA's `cost_analysis()` counts every computation once, so a while loop (the `nn.scan` over
layers, the microbatch scan) contributes one iteration: for a 32-layer scanned model its FLOPs
are about 1/32 of the step's. `analyze_hlo` walks the module's call graph instead, multiplying
each while body by its trip count (XLA's `known_trip_count`, else the `counter < N` condition
a scan lowers to, which is all the TPU compiler leaves), and sums per device:

- FLOPs: 2 x output x contraction for every `dot`, and for every `convolution` (the TPU
  compiler's form of a matmul, batch and contraction dims as windows with base dilation)
  counting only the window positions that touch real input; fusion bodies included;
- HBM bytes: operands + results of each top-level instruction (a fusion counts as the one
  kernel it is; bookkeeping ops such as tuple/bitcast/parameter move nothing);
- collective bytes by kind: the larger of what an op sends and what it receives;
- Pallas kernels by backend and name; a kernel's FLOPs are its declared cost estimate
  (Mosaic carries one), else 2 M K N from a grouped matmul's shapes (Triton).

These are estimates from shapes, as XLA's own cost model is: cache reuse, overlap and what
happens inside custom kernels are not modelled.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

COLLECTIVE_KINDS = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
)
# Ops that move no data of their own (or whose cost is counted in the computations they call).
_NO_TRAFFIC = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
    "call", "after-all", "partition-id", "replica-id", "opt-barrier", "async-start",
    "async-update", "async-done", "copy-done", "send-done", "recv-done", "iota",
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([<=0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(
    r"\b(condition|body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
# A Pallas kernel's own estimate (pl.CostEstimate), which Mosaic carries in its backend config.
_KERNEL_FLOPS = re.compile(r'"cost_estimate":\{"flops":"?(\d+)')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _bits(dtype: str) -> int:
    if dtype == "pred":
        return 8
    if dtype in ("token", "tuple", "opaque"):
        return 0
    m = re.search(r"\d+", dtype)
    return int(m.group()) if m else 0


def _array_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        n = math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d)
        total += n * _bits(dtype) // 8
    return total


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "({":
            depth += 1
        elif text[i] in ")}":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


@dataclasses.dataclass(frozen=True)
class _Instr:
    name: str
    op: str
    result: str  # result type text
    operands: str  # operand list text (with their types)
    attrs: str


def _parse_instr(line: str) -> _Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    name, rest = m.groups()
    if rest.startswith("("):  # tuple result type
        end = _closing(rest, 0)
        result, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        result, _, rest = rest.partition(" ")
    op_m = re.match(r"([\w\-]+)\(", rest)
    if not op_m:
        return None
    open_at = op_m.end() - 1
    close_at = _closing(rest, open_at)
    return _Instr(name, op_m.group(1), result, rest[open_at + 1 : close_at], rest[close_at + 1 :])


def _computations(hlo_text: str) -> tuple[dict[str, list[_Instr]], str]:
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        if not line.strip() or line.startswith("HloModule"):
            continue
        if not line[0].isspace() and line.rstrip().endswith("{"):
            is_entry = line.startswith("ENTRY")
            header = line.removeprefix("ENTRY").strip().lstrip("%")
            current = re.match(r"[\w.\-]+", header).group()
            comps[current] = []
            if is_entry:
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            instr = _parse_instr(line)
            if instr is not None:
                comps[current].append(instr)
    return comps, entry


def _split_top(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def _operand_types(instr: _Instr, types: dict[str, str]) -> list[str]:
    """Each operand's type text: printed inline (GPU) or looked up by name (TPU prints none)."""
    out = []
    for part in _split_top(instr.operands):
        if _ARRAY.search(part):
            out.append(part)
        else:
            ref = re.search(r"%?([\w.\-]+)", part)
            out.append(types.get(ref.group(1), "") if ref else "")
    return out


def _dot_flops(instr: _Instr, operands: list[str]) -> int:
    out = _ARRAY.search(instr.result)
    lhs = _ARRAY.search(operands[0]) if operands else None
    contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
    if not (out and lhs and contracting):
        return 0
    lhs_dims = [int(d.lstrip("<=")) for d in lhs.group(2).split(",") if d]
    out_elems = math.prod(int(d.lstrip("<=")) for d in out.group(2).split(",") if d)
    k = math.prod(lhs_dims[int(i)] for i in contracting.group(1).split(",") if i)
    return 2 * out_elems * k


def _dims(type_text: str) -> list[int]:
    m = _ARRAY.search(type_text)
    return [int(d.lstrip("<=")) for d in m.group(2).split(",") if d] if m else []


def _window_pairs(out: int, size: int, inp: int, stride: int, pad_lo: int, lhs_dil: int,
                  rhs_dil: int) -> int:  # fmt: skip
    """(output, window) position pairs of one spatial dimension that read a real input
    element, not padding or a hole of the base dilation."""
    pos = (
        np.arange(out)[:, None] * stride + np.arange(size)[None, :] * rhs_dil - pad_lo
    )  # in the dilated, padded input's coordinates
    return int(((pos >= 0) & (pos <= (inp - 1) * lhs_dil) & (pos % lhs_dil == 0)).sum())


def _conv_flops(instr: _Instr, operands: list[str]) -> int:
    """FLOPs of a convolution, which is how the TPU compiler writes its matmuls (batch and
    contraction dimensions become windows with base dilation): 2 x batch x output features x
    input features x the window positions that touch real input."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    if len(operands) < 2 or not labels:
        return 0
    lhs_l, rhs_l, out_l = labels.groups()
    lhs, rhs, out = _dims(operands[0]), _dims(operands[1]), _dims(instr.result)
    if not (len(lhs) == len(lhs_l) and len(rhs) == len(rhs_l) and len(out) == len(out_l)):
        return 0
    window = re.search(r"window=\{([^}]*)\}", instr.attrs)
    fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}

    def per_dim(name: str, default: int) -> list[int]:
        if name not in fields:
            return [default] * (len(rhs_l) - 2)
        return [int(v.split("_")[0]) for v in fields[name].split("x")]

    stride, pad = per_dim("stride", 1), per_dim("pad", 0)
    lhs_dil, rhs_dil = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    pairs = 1
    for i in range(len(rhs_l) - 2):
        d = str(i)
        pairs *= _window_pairs(
            out[out_l.index(d)], rhs[rhs_l.index(d)], lhs[lhs_l.index(d)], stride[i], pad[i],
            lhs_dil[i], rhs_dil[i],
        )  # fmt: skip
    return 2 * out[out_l.index("b")] * rhs[rhs_l.index("o")] * rhs[rhs_l.index("i")] * pairs


def _collective_bytes(instr: _Instr, operands: list[str]) -> int:
    if instr.op.removesuffix("-start") == "ragged-all-to-all":
        # (data, output, offsets and sizes): the most it can send is all of `data`; how much
        # it does depends on the sizes at run time.
        return _array_bytes(operands[0])
    sent = sum(_array_bytes(t) for t in operands)
    received = _array_bytes(instr.result)
    if instr.op.endswith("-start"):  # the result tuple repeats the operand buffers
        received = max(received - sent, 0)
    return max(sent, received)


@dataclasses.dataclass(frozen=True)
class HloStats:
    """Per-device, per-step totals of one compiled module (trip counts applied).

    Attributes:
      flops: FLOPs of the dots and convolutions, plus what Pallas kernels declare.
      hbm_bytes: bytes read and written by top-level instructions (custom kernels included).
      collective_bytes: kind ("all-gather", ...) -> bytes; kinds that do not occur are absent.
      collective_counts: kind -> executed ops.
      custom_calls: "target" or "target:kernel name" -> executed calls.
      unknown_trip_counts: while loops without a known trip count (counted once).
    """

    flops: float
    hbm_bytes: float
    collective_bytes: dict[str, float]
    collective_counts: dict[str, int]
    custom_calls: dict[str, int]
    unknown_trip_counts: int


def _kernel_name(instr: _Instr) -> str | None:
    """ "mosaic:<kernel>" or "triton:<kernel>" for a Pallas kernel, None for other custom calls.

    The kernel's name is the scope its pallas_call was traced in (`.../moejax_gmm/pallas_call`).
    """
    target = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
    target = target.group(1) if target else ""
    if target == "tpu_custom_call":
        backend = "mosaic"
    elif "triton" in target:
        backend = "triton"
    else:
        return None
    scope = re.search(r'op_name="[^"]*?([\w.\-]+)/pallas_call"', instr.attrs)
    return f"{backend}:{scope.group(1) if scope else instr.name}"


def _gmm_flops(instr: _Instr, operands: list[str]) -> int:
    """2 M K N of a grouped matmul kernel that declares no cost (Triton): out [M, N] from
    lhs [M, K] (gmm), or out [G, K, N] from lhs [M, K] and grad [M, N] (tgmm); rows include
    the layout's padding, as the kernel computes them."""
    out = [d for d in _dims(instr.result) if d > 1]
    floats = [_dims(t) for t in operands if re.match(r"\s*(bf16|f16|f32|f8)", t)]
    mats = [d for d in floats if len(d) == 2]
    if len(out) == 2 and mats and mats[0][0] == out[0]:
        return 2 * out[0] * out[1] * mats[0][1]
    if len(out) == 3 and len(mats) >= 2 and mats[0][0] == mats[1][0]:
        return 2 * mats[0][0] * out[1] * out[2]
    return 0


def _trip_count(instr: _Instr, comps: dict[str, list[_Instr]]) -> int | None:
    """A while loop's trip count: XLA's known_trip_count, else the scan pattern of its condition
    (counter < constant N, counting from 0), as the TPU compiler's HLO leaves it."""
    known = _TRIP.search(instr.attrs)
    if known:
        return int(known.group(1))
    cond = re.search(r"\bcondition=%?([\w.\-]+)", instr.attrs)
    body = comps.get(cond.group(1), []) if cond else []
    limits = [
        int(c.group(1))
        for i in body
        if i.op == "constant" and (c := re.fullmatch(r"(-?\d+)", i.operands.strip()))
    ]
    if len(limits) == 1 and any(i.op == "compare" and "direction=LT" in i.attrs for i in body):
        return limits[0]
    return None


def analyze_hlo(hlo_text: str) -> HloStats:
    """Per-step statistics of an optimized HLO module (`compiled.as_text()`); see the module doc."""
    comps, entry = _computations(hlo_text)
    callers: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    fused: set[str] = set()  # fusion bodies and reducers: no top-level traffic of their own
    unknown = 0
    for comp, instrs in comps.items():
        for instr in instrs:
            trip = 1
            if instr.op == "while":
                trip = _trip_count(instr, comps)
                unknown += trip is None
                trip = 1 if trip is None else trip
            for kind, callee in _CALLEE.findall(instr.attrs):
                callers[callee].append((comp, trip if kind in ("body", "condition") else 1))
                if kind == "to_apply" or instr.op == "fusion":
                    fused.add(callee)
            for branches in _BRANCHES.findall(instr.attrs):
                for callee in re.findall(r"%?([\w.\-]+)", branches):
                    callers[callee].append((comp, 1))
    resolved: dict[str, int] = {entry: 1}

    def times(comp: str) -> int:
        # Executions per step: the sum over call sites (computations unreachable from the
        # entry, e.g. left-over clones, get 0).
        if comp not in resolved:
            resolved[comp] = 0  # breaks cycles, which valid HLO does not have
            resolved[comp] = sum(times(c) * t for c, t in callers.get(comp, []))
        return resolved[comp]

    flops = traffic = 0.0
    coll_bytes: dict[str, float] = collections.defaultdict(float)
    coll_counts: dict[str, int] = collections.defaultdict(int)
    customs: dict[str, int] = collections.defaultdict(int)
    for comp in comps:
        m = times(comp)
        if not m:
            continue
        types = {i.name: i.result for i in comps[comp]}
        for instr in comps[comp]:
            base = instr.op.removesuffix("-start")
            operands = _operand_types(instr, types)
            if instr.op == "dot":
                flops += m * _dot_flops(instr, operands)
            elif instr.op == "convolution":
                flops += m * _conv_flops(instr, operands)
            if base in COLLECTIVE_KINDS:
                coll_bytes[base] += m * _collective_bytes(instr, operands)
                coll_counts[base] += m
                continue
            if instr.op == "custom-call" and (kernel := _kernel_name(instr)):
                customs[kernel] += m
                declared = _KERNEL_FLOPS.search(instr.attrs)
                kernel_flops = int(declared.group(1)) if declared else _gmm_flops(instr, operands)
                flops += m * kernel_flops
            if comp not in fused and instr.op not in _NO_TRAFFIC and not instr.op.endswith("-done"):
                in_bytes = sum(_array_bytes(t) for t in operands)
                traffic += m * (in_bytes + _array_bytes(instr.result))
    return HloStats(
        flops=flops,
        hbm_bytes=traffic,
        collective_bytes=dict(coll_bytes),
        collective_counts=dict(coll_counts),
        custom_calls=dict(customs),
        unknown_trip_counts=unknown,
    )


# Ops that compute (rather than move or bookkeep): what a collective in flight can hide behind.
_COMPUTE_OPS = ("fusion", "custom-call", "while", "dot", "convolution")


def _is_matmul_work(instr: _Instr) -> bool:
    # A grouped matmul: a Pallas kernel, a loop (the XLA gmm's tile loop), or a bare dot.
    if instr.op == "custom-call":
        return _kernel_name(instr) is not None
    return instr.op in ("while", "dot", "convolution")


def async_overlap(hlo_text: str, kind: str = "all-to-all", *, matmuls: bool = False) -> list[int]:
    """How many compute ops the schedule runs while each asynchronous `kind` collective is in
    flight, one count per `<kind>-start` (optimized, scheduled HLO: `compiled.as_text()`).

    A compiled module lists each computation's instructions in schedule order, so the compute
    ops (fusions, custom calls, while loops, dots; with matmuls=True only Pallas kernels, loops
    and dots: the grouped matmuls) between a start and its done are what the collective
    overlaps. A synchronous collective (no start/done pair) has no entry.
    """
    comps, _ = _computations(hlo_text)
    counts = []
    for instrs in comps.values():
        open_: dict[str, int] = {}
        for instr in instrs:
            if instr.op == f"{kind}-start":
                open_[instr.name] = 0
            elif instr.op == f"{kind}-done":
                started = re.search(r"%?([\w.\-]+)", instr.operands)
                if started and started.group(1) in open_:
                    counts.append(open_.pop(started.group(1)))
            elif _is_matmul_work(instr) if matmuls else instr.op in _COMPUTE_OPS:
                for name in open_:
                    open_[name] += 1
    return counts
