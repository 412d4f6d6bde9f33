"""Every Triton kernel in service/kernels, compiled ahead of time for sm_80 and sm_90 on a machine without
a GPU: the weights move as 128-bit vectors when the launch proves 16-divisibility, and as scalars when it
does not (the control showing the hint is what buys the vectors).

How: `triton.compile(triton.compiler.ASTSource(fn=jit_fn, signature={arg: "*i32" | "i32" | "constexpr"},
constexprs={arg: value}, attrs={(arg_index,): [["tt.divisibility", 16]]}), target=GPUTarget("cuda", arch, 32))`
(Triton 3.8). The hint is made by `make_backend(target).parse_attr("D")`, the call the JIT makes when a launch
finds a pointer 16-byte aligned or an int divisible by 16. The compile runs every stage, ttir -> ttgir -> llir
-> ptx -> cubin; PTX text is `compiled.asm["ptx"]`. No GPU and no CUDA toolkit are needed: the wheel ships
ptxas (triton/backends/nvidia/bin/ptxas), which the nvidia backend also runs for its version even to stop at
PTX, so a full compile is the simplest path and the cubin proves ptxas accepts the PTX for that arch.

The compile runs in a child process: conftest sets TRITON_INTERPRET=1 before triton is imported, which turns
every @triton.jit function, triton.language's own helpers included, into an interpreter function the compiler
cannot lower. The child (`python -m tests.kernels.test_kernel_ptx OUT`) imports triton without it, writes one .ptx per
variant, target and hint, and a summary; the tests read the PTX.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from service.kernels.reference import BITS_VIEW
from service.kernels.triton_mask import BLOCK_BYTES

pytestmark = pytest.mark.slow  # every kernel compiled in a child process: seconds

ARCHS = (80, 90)
EXPECTED_PTX_TARGET = {80: "sm_80", 90: "sm_90a"}  # Triton compiles sm_90 as sm_90a
TRITON_TYPE = {torch.int32: "i32", torch.int16: "i16"}
THREADS_PER_WARP = 32
# `@%p5 ld.global.v4.b32 { ... }`, `st.global.b16 [...]`: optional predicate, then op, modifiers and type
ACCESS = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:ld|st)\.global\S*)", re.MULTILINE)


@dataclass(frozen=True)
class Variant:
    kernel: str  # "module.function" inside service.kernels
    name: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    weight_bits: int  # width of one weight element as the kernel moves it

    def __str__(self) -> str:
        return self.name


def mask_apply_variants() -> list[Variant]:
    """What `apply_masks_triton` launches: weights as int32 (float32) or int16 (float16, bfloat16) bit
    patterns, binary (HAS_NEGATIVE=False, the negative pointer is a dummy) or ternary."""
    variants = []
    for bits_dtype in sorted(set(BITS_VIEW.values()), key=lambda d: -torch.iinfo(d).bits):
        width, pointer = torch.iinfo(bits_dtype).bits, "*" + TRITON_TYPE[bits_dtype]
        carries = "+".join(str(d).removeprefix("torch.") for d, b in BITS_VIEW.items() if b == bits_dtype)
        for has_negative in (False, True):
            variants.append(
                Variant(
                    kernel="triton_mask._apply_masks_kernel",
                    name=f"{carries}-{'ternary' if has_negative else 'binary'}",
                    signature={
                        "weights_ptr": pointer,
                        "nonzero_ptr": "*u8",
                        "negative_ptr": "*u8",
                        "out_ptr": pointer,
                        "n_weights": "i32",
                        "SIGN_BIT": "constexpr",
                        "HAS_NEGATIVE": "constexpr",
                        "BLOCK_BYTES": "constexpr",
                    },
                    constexprs={
                        "SIGN_BIT": -(1 << (width - 1)),
                        "HAS_NEGATIVE": has_negative,
                        "BLOCK_BYTES": BLOCK_BYTES,
                    },
                    weight_bits=width,
                )
            )
    return variants


VARIANTS = mask_apply_variants()


def artifact_name(variant: Variant, arch: int, hinted: bool) -> str:
    return f"{variant.name}-sm{arch}-{'hint16' if hinted else 'nohint'}"


def discover_kernels() -> dict[str, object]:
    """Every JITFunction defined (not merely imported) in a module of service.kernels, by "module.name"."""
    from triton.runtime.jit import JITFunction

    import service.kernels

    found = {}
    for info in pkgutil.iter_modules(service.kernels.__path__):
        module = importlib.import_module(f"service.kernels.{info.name}")
        for attribute, value in vars(module).items():
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
                found[f"{info.name}.{attribute}"] = value
    return found


def compile_all(out: Path) -> None:
    """Child process: compile every variant for every arch, with and without the 16-divisibility hint."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    kernels = discover_kernels()
    summary: dict = {"kernels": sorted(kernels), "compiled": {}}
    for variant in VARIANTS:
        fn = kernels[variant.kernel]
        for arch in ARCHS:
            target = GPUTarget("cuda", arch, THREADS_PER_WARP)
            divisible = make_backend(target).parse_attr("D")
            runtime_args = [name for name, kind in variant.signature.items() if kind != "constexpr"]
            for hinted in (True, False):
                attrs = {(fn.arg_names.index(name),): divisible for name in runtime_args} if hinted else {}
                source = triton.compiler.ASTSource(
                    fn=fn, signature=variant.signature, constexprs=variant.constexprs, attrs=attrs
                )
                compiled = triton.compile(source, target=target)
                name = artifact_name(variant, arch, hinted)
                (out / f"{name}.ptx").write_text(compiled.asm["ptx"])
                summary["compiled"][name] = {
                    "num_warps": compiled.metadata.num_warps,
                    "cubin_bytes": len(compiled.asm["cubin"]),
                }
    (out / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "triton-cache")  # compile for real, never from an old cache
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernels.test_kernel_ptx", str(out)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out, json.loads((out / "summary.json").read_text())


def weight_accesses(ptx: str) -> dict[str, list[int]]:
    """Bits moved per global load and store instruction, leaving out the 8-bit mask-plane loads."""
    widths: dict[str, list[int]] = {"ld": [], "st": []}
    for instruction in ACCESS.findall(ptx):
        vector = re.search(r"\.v(\d)\b", instruction)
        element = int(re.search(r"\.[bsuf](\d+)$", instruction).group(1))
        if element != 8:
            widths[instruction[:2]].append((int(vector.group(1)) if vector else 1) * element)
    return widths


def read(compiled, variant: Variant, arch: int, hinted: bool) -> tuple[str, dict[str, list[int]], dict]:
    out, summary = compiled
    name = artifact_name(variant, arch, hinted)
    ptx = (out / f"{name}.ptx").read_text()
    return ptx, weight_accesses(ptx), summary["compiled"][name]


def assert_each_weight_moved_once(accesses: dict[str, list[int]], info: dict, variant: Variant) -> None:
    """Per program, the threads' loads (and stores) cover exactly the block's 8 * BLOCK_BYTES weights."""
    threads = info["num_warps"] * THREADS_PER_WARP
    for op in ("ld", "st"):
        assert sum(accesses[op]) * threads == 8 * BLOCK_BYTES * variant.weight_bits, (op, accesses[op])


def test_every_triton_kernel_in_the_package_is_compiled(compiled):
    _, summary = compiled
    assert summary["kernels"], "no @triton.jit kernel found in service/kernels"
    assert summary["kernels"] == sorted({v.kernel for v in VARIANTS})


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_weights_move_as_128_bit_vectors_with_the_divisibility_hint(compiled, variant, arch):
    ptx, accesses, info = read(compiled, variant, arch, hinted=True)
    assert f".target {EXPECTED_PTX_TARGET[arch]}" in ptx
    assert info["cubin_bytes"] > 0  # ptxas assembled it for this arch
    assert accesses["ld"] and accesses["st"]
    assert set(accesses["ld"]) == {128} and set(accesses["st"]) == {128}, accesses
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx
    assert_each_weight_moved_once(accesses, info, variant)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_weights_move_as_scalars_without_the_hint(compiled, variant, arch):
    ptx, accesses, info = read(compiled, variant, arch, hinted=False)
    assert f".target {EXPECTED_PTX_TARGET[arch]}" in ptx
    assert accesses["ld"] and accesses["st"]
    assert set(accesses["ld"]) == {variant.weight_bits} and set(accesses["st"]) == {variant.weight_bits}, accesses
    assert ".v4." not in "".join(ACCESS.findall(ptx))
    assert_each_weight_moved_once(accesses, info, variant)


if __name__ == "__main__":
    compile_all(Path(sys.argv[1]))
