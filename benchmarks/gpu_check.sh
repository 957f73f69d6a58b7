#!/usr/bin/env bash
# Short CUDA runs of every example and of the benchmark, each under a time limit; a failing step does
# not stop the others. $OUT (default outputs/gpu_check) gets logs.txt and each run's metrics as JSON.
#
#   bash benchmarks/gpu_check.sh            # on a machine with a GPU, from the repository root
set -u
out=${OUT:-outputs/gpu_check}
work=${WORK:-/tmp/gpu_check}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a limit, keeps its log, prints its tail
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name: $*"
    timeout "$limit" "$@" >"$work/$name.log" 2>&1
    local rc=$?
    echo "-- $name: exit $rc after $((SECONDS - start)) s"
    tail -n 12 "$work/$name.log" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 8
    { echo "===== $name (exit $rc, $((SECONDS - start)) s): $*"; tr '\r' '\n' <"$work/$name.log"; } >>"$out/logs.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

step toy 45 python examples/toy_2d.py --device cuda -n 300 --no-progress --out "$work/toy"
step vae_ffjord 90 python examples/vae.py --device cuda --num-train 0 --num-val 0 --num-test 1000 -n 2 \
    --warmup 1 --max-width 0 --max-rank 0 --is-samples 100 --no-progress --out "$work/vae_ffjord"
step vae_gaussian 45 python examples/vae.py --device cuda --num-train 0 --num-val 0 --num-test 1000 -n 2 \
    --warmup 1 --posterior gaussian --is-samples 100 --no-progress --out "$work/vae_gaussian"
step images 45 python examples/images.py --objective ml --device cuda -n 100 --num-test 1000 --eval-batch-size 500 \
    --no-progress --out "$work/images"
step images_fm 90 python examples/images.py --device cuda --objective fm -n 3000 --num-train 0 --batch-size 128 \
    --unet-channels 32,64,64 --lr 2e-3 --num-test 1000 --eval-batch-size 500 --no-progress --out "$work/images_fm"
step vae_nccl 45 torchrun --standalone --nproc_per_node=1 examples/vae.py --distributed --device cuda -n 1 \
    --num-test 200 --is-samples 10 --no-progress --out "$work/vae_nccl"
step svi 90 python benchmarks/bench_svi.py --device cuda --models conjugate,banana --contenders ffjord,iaf \
    --budget 10 --steps 20 --predictive 200 --out "$out/svi.json"
step bench 90 python benchmarks/bench_cnf.py --device cuda --budget 10 --workloads toy2d --out "$out/bench.json"

for run in toy vae_ffjord vae_gaussian images images_fm; do
    [ -f "$work/$run/metrics.json" ] && cp "$work/$run/metrics.json" "$out/$run.json"
done
exit 0
