#!/usr/bin/env bash
# One prepared GPU measurement for a lent H100/H200 (about 6-8 minutes): the scale-m forward pass and train
# step at 640 px, batch 1 and 64, in the GPU default bfloat16 compute (model.compute_dtype 'auto'), with
# images/s and MFU, beside the deviceless compile report's memory estimate for the same GPU.
#
#   bash scripts/gpu_benchmark.sh [OUT_DIR]        # needs jax with CUDA: pip install -e '.[cuda12]'
#
# Writes OUT_DIR/bench.jsonl (scripts/benchmark.py records), OUT_DIR/report.json (scripts/compile_report.py)
# and prints a summary table. MFU = the program's FLOPs (XLA's cost analysis of the compiled program on
# this GPU) / median step time / the GPU's dense bf16 peak. The compile report's figures are estimates.
set -euo pipefail
OUT="${1:-runs/gpu_benchmark}"
CONFIG=configs/optsar_rsvg.py
mkdir -p "$OUT"
python -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 'no GPU backend: install the cuda12 extra')"
: > "$OUT/bench.jsonl"
for what in forward train_step; do
  for batch in 1 64; do
    python scripts/benchmark.py --what "$what" --config "$CONFIG" --batch "$batch" --imgsz 640 \
        --warmup 2 --repeats 5 | tail -n 1 >> "$OUT/bench.jsonl"
  done
done
KIND=$(python -c "import jax; print(jax.devices()[0].device_kind)")
case "$KIND" in *H200*) TOPO=h200:1 ;; *) TOPO=h100:1 ;; esac
JAX_PLATFORMS=cpu python scripts/compile_report.py --config "$CONFIG" --topology "$TOPO" --per_chip_batch 64 \
    --what train_step,predict --json "$OUT/report.json" > "$OUT/report.txt" 2>&1 || echo "compile report failed (see $OUT/report.txt)"
python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
PEAK_BF16_TFLOPS = {'H100': 989.4, 'H200': 989.4}   # dense bf16 tensor-core peak, SXM parts
rows = [json.loads(line) for line in open(os.path.join(out, 'bench.jsonl')) if line.strip()]
report = {}
if os.path.exists(os.path.join(out, 'report.json')):
  report = json.load(open(os.path.join(out, 'report.json')))
print(f"{'what':<11} {'batch':>5} {'median_s':>9} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'report GiB (estimate)':>22}")
for r in rows:
  peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in r['device']), None)
  tflops = r['gflops_per_s'] / 1e3 if r.get('gflops_per_s') else None
  mfu = f"{100 * tflops / peak:.1f}%" if tflops and peak else '-'
  est = report.get('train_step' if r['what'] == 'train_step' else 'predict', {}).get('memory', {})
  est_gib = f"{est['peak_bytes'] / 2**30:.2f} (batch 64)" if est and r['batch'] == 64 else '-'
  mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get('peak_memory_bytes') else '-'
  print(f"{r['what']:<11} {r['batch']:>5} {r['median_s']:>9.4f} {r['batch'] / r['median_s']:>8.1f} "
        f"{(tflops or float('nan')):>8.1f} {mfu:>6} {mem:>9} {est_gib:>22}")
PY
