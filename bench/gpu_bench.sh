#!/usr/bin/env bash
# The GPU check of extraction (bf16, compiled, fp32, device decoding), as one script for a lent GPU machine (never run by the tests or CI):
# bf16 extract (eager and compiled) of 2,048 real photos vs the tutorial loop on the GPU, with PIL
# decoding and with --decode device (nvJPEG), GPU utilisation sampled by nvidia-smi every 0.5 s,
# and where the time went (bench_extract's stage columns). Results go to $OUT (or ./gpu-bench).
#
#   bash bench/gpu_bench.sh [PHOTOS_DIR]     # default ../shared/data/catsdogs (+ catsdogs_test)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-bench}"
mkdir -p "$out"
python=${PYTHON:-python}
shared="$(cd .. && pwd)/shared/data"
data="${TMPDIR:-/tmp}/gpu-bench-photos"  # 2,048: the real photos, topped up with mirrored copies (never in ../shared)
"$python" - "$data" "${1:-$shared/catsdogs}" "$shared/catsdogs_test" <<'EOF'
import sys
from pathlib import Path
from PIL import Image, ImageOps
dest, sources = Path(sys.argv[1]), [Path(s) for s in sys.argv[2:] if Path(s).is_dir()]
files = sorted(p for s in sources for p in s.glob("*/*.jpg"))
if not files:
    sys.exit(f"no photos in {', '.join(sys.argv[2:])}: pass a folder of class sub-folders of JPEGs")
for i in range(2048):
    src = files[i % len(files)]
    target = dest / src.parent.name / f"{i}-{src.name}"
    if target.exists():
        continue
    target.parent.mkdir(parents=True, exist_ok=True)
    if i < len(files):
        target.symlink_to(src.resolve())
    else:
        ImageOps.mirror(Image.open(src).convert("RGB")).save(target, quality=95)
print(f"{dest}: 2048 photos", file=sys.stderr)
EOF
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
smi=
trap '[ -n "$smi" ] && kill "$smi" 2>/dev/null' EXIT
for decode in pil device; do
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 \
    > "$out/util-$decode.csv" &
  smi=$!
  "$python" bench/bench_extract.py --device cuda --data "$data" --n 2048 --decode "$decode" \
    --only bf16 bf16+compile fp32 --batch-size 128 --flat-small 256 --flat-large 2048 \
    --json-out "$out/extract-$decode.json" | tee "$out/extract-$decode.md"
  kill "$smi"; smi=
  "$python" - "$out/util-$decode.csv" <<'EOF'
import sys
u = [float(l.split(",")[1].split()[0]) for l in open(sys.argv[1]) if l.count(",") >= 2]
busy = [x for x in u if x > 0]
print(f"GPU utilisation ({sys.argv[1]}): mean {sum(u) / max(1, len(u)):.0f} %, "
      f"mean while busy {sum(busy) / max(1, len(busy)):.0f} %, {len(u)} samples")
EOF
done
