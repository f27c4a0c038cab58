#!/usr/bin/env bash
# Fill .whl/ with the wheels the lent GPU machine lacks (shared/PLATFORM.md, "The lent GPU machine": Python 3.12,
# torch 2.11 + CUDA 13, transformers 5.17, no Ray, bitsandbytes, DeepSpeed or pydantic, no index), so that
# bench/gpu_check.sh can run there with `carry: [".whl"]`. Run from the repository root, on a machine with an index:
#   bash bench/gpu_bundle.sh            # then: bash bench/gpu_check.sh there
# What goes in, and why:
#   pydantic, pydantic_core, annotated_types, typing_inspection   orchestrator.config's schema (absent there)
#   typing_extensions 4.16                                         pydantic 2.14 requires >= 4.16 (the machine's is unknown)
#   transformers 5.24, peft 0.21.2                                 the versions rayft pins (the machine has 5.17, which
#                                                                  requires what 5.24 does: tokenizers >= 0.23.1,
#                                                                  safetensors >= 0.8, regex, huggingface-hub >= 1.31 ...)
#   deepspeed 0.19.8 (+ hjson)                                     ZeRO; only an sdist exists: built here as a
#                                                                  pure-Python wheel (DS_BUILD_OPS=0: ops JIT-built there)
#   bitsandbytes 0.50.2, CUDA 13 library only                      4-bit; its wheel (~43 MB) holds one library
#                                                                  per CUDA version: the others are removed
# Ray is not carried (its wheel alone is ~79 MB): the check runs the worker path without it (jobs/local_worker.py).
# The whole call (working tree + .whl) must stay under 64 MiB; the total is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-.whl}
PYVER=${PYVER:-3.12}  # the lent machine's Python
CUDA_LIB=${BNB_CUDA:-cuda130}  # the lent machine's torch is built for CUDA 13.0
mkdir -p "$OUT"
rm -f "$OUT"/*.whl

download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform linux_x86_64 -d "$OUT" "$@"
}

download pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0 \
  transformers==5.24.0 peft==0.21.2 hjson==3.1.0 bitsandbytes==0.50.2

# DeepSpeed: a wheel built from its sdist without ops (they JIT-build on first use; the machine has ninja + nvcc)
build=$(mktemp -d)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$build" deepspeed==0.19.8
mv "$build"/deepspeed-*.whl "$OUT"/
rm -rf "$build"

# bitsandbytes: keep only the CUDA 13 library (and the CPU one); drop the others from the wheel and its RECORD
"$PY" - "$OUT" "$CUDA_LIB" <<'EOF'
import sys, zipfile
from pathlib import Path

out, keep = Path(sys.argv[1]), sys.argv[2]
wheel = next(out.glob("bitsandbytes-*.whl"))
trimmed = wheel.with_suffix(".trimmed")

def dropped(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith("libbitsandbytes_") and not base.startswith((f"libbitsandbytes_{keep}.", "libbitsandbytes_cpu."))

removed = []
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if dropped(info.filename):
            removed.append(info.filename)
            continue
        data = src.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(line for line in lines if not dropped(line.split(",", 1)[0])) + "\n").encode()
        dst.writestr(info, data)
kept = [n for n in zipfile.ZipFile(trimmed).namelist() if n.rsplit("/", 1)[-1].startswith("libbitsandbytes_")]
if not any(keep in n for n in kept):
    sys.exit(f"{wheel.name}: no libbitsandbytes_{keep} library in it (kept {kept})")
trimmed.replace(wheel)
print(f"bitsandbytes: removed {len(removed)} libraries, kept {kept}", file=sys.stderr)
EOF

echo "wheels in $OUT:" >&2
ls -l "$OUT" >&2
whl=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((whl + tree))
echo "bundle: .whl $((whl / 1024)) KiB + working tree $((tree / 1024)) KiB = $((total / 1048576)) MiB (limit 64 MiB)" >&2
if [ "$total" -ge $((64 * 1048576)) ]; then
  echo "too large for one call: carry .whl in two calls (files stay between calls in quick succession)" >&2
  exit 1
fi
