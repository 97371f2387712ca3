#!/usr/bin/env bash
# One prepared GPU session for issue 16 (training beside nanoGPT, decode speed), run from the repository root:
#
#     bash benchmarks/gpu_session.sh                 # on the GPU machine; tables go to $OUT/*.txt
#     SMOKE=1 OUT=/tmp/gs bash benchmarks/gpu_session.sh   # tiny sizes on the CPU: checks every part's arguments
#
# Parts, each under its own `timeout` and each writing its table to $OUT/<part>.txt as it goes (a part
# that times out or fails still leaves what it printed, and the next part runs):
#   1 env         nvidia-smi, torch / CUDA / transformers versions
#   2 graphs      benchmarks/decode_graphs.py: CUDA-graph decode against the eager step (greedy tokens compared,
#                 tok/s at batch 1/8/64, the bandwidth bound), gpt2-124m and llama-1b, bf16
#   3 generate    benchmarks/generate.py: gpt2-124m bf16 decode tokens/s at batch 1 and 64 (haina vs transformers)
#   4 train       benchmarks/train_throughput.py: haina beside nanoGPT's bench.py configuration (GPT-2 124M
#                 shapes, bias off as in bench.py, bf16, compiled, batch 16 × 1024), interleaved rounds, with
#                 TRAIN_VARIANTS (default attention=cudnn) as further haina sides; LOSS_AB=1 adds haina with its
#                 loss outside the compiled graph (the state before issue 16)
#   5 finetune    benchmarks/finetune.py on CUDA, only with FT=1
#   6 gqa         SDPA with grouped key/value heads against copied ones, only with GQA=1 (measured 2026-12-04)
# Serving is not measured here: `haina serve` needs fastapi/uvicorn/pydantic, which the GPU image lacks.
#
# Environment: NANOGPT (default .cache/nanogpt, a nanoGPT checkout carried with the working tree), PY (python3),
# OUT (where tables go), SMOKE=1, LOSS_AB=1, FT=1, GQA=1, TRAIN_VARIANTS, and T_ENV / T_GRAPHS / T_GEN / T_TRAIN /
# T_FT / T_GQA (per-part limits in seconds; parts 1-4 add up to 570 s by default, under one device call's 600).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
PY=${PY:-python3}
NANOGPT=${NANOGPT:-.cache/nanogpt}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SESSION_START=$(date +%s)

# part NAME LIMIT_SECONDS COMMAND...: run it under `timeout`, output to $OUT/NAME.txt, its tail to the log.
part() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit} s, $(( start - SESSION_START )) s into the session)"
    { echo "\$ $*"; echo; } > "$OUT/$name.txt"
    timeout -k 10 "$limit" "$@" >> "$OUT/$name.txt" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMED OUT after ${limit} s (what it printed is kept)" ;;
        *) status="FAILED with exit status $rc" ;;
    esac
    echo "-- $name: $status, $(( $(date +%s) - start )) s" >> "$OUT/$name.txt"
    # Tables and errors, not the progress lines, into the session log.
    grep -v '^round [0-9]*:\|warm-up steps' "$OUT/$name.txt" | tail -n 40
    echo
}

if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu
    TRAIN_ARGS=(--presets tiny --batch-size 2 --block-size 32 --warmup 1 --steps 2 --rounds 2 --precision fp32)
    GRAPH_ARGS=(--device cpu --quick)
    TRAIN_VARIANTS=${TRAIN_VARIANTS:-compile_mode=default}  # the attention kernels are CUDA's: none on a CPU
    GEN_ARGS=(--preset tiny --dtype float32 --batch-sizes 1 2 --prompt-len 8 --new-tokens 8 --repeats 1)
    FT_ARGS=(--rounds 1 --steps 2 --warmup 1 --batch-size 2 --block-size 64 --max-records 40
             --configs haina-full-pad hf-full)
else
    DEVICE=cuda
    # bench.py's own configuration (bias=False, dropout 0, compile, bf16) at the issue's batch of 16 × 1024.
    GRAPH_ARGS=(--device cuda --rounds 3)
    TRAIN_ARGS=(--presets gpt2-124m --batch-size 16 --block-size 1024 --bias false --precision bf16 --compile
                --warmup 10 --steps 20 --rounds 3)
    GEN_ARGS=(--preset gpt2-124m --dtype bfloat16 --batch-sizes 1 64 --prompt-len 128 --new-tokens 128 --repeats 3)
    FT_ARGS=(--rounds 2 --steps 20 --warmup 3 --precision bf16 --configs haina-full-pad haina-lora-pad hf-full hf-lora)
fi
[ "${LOSS_AB:-0}" = 1 ] && TRAIN_ARGS+=(--loss-outside-too)
read -r -a VARIANTS <<< "${TRAIN_VARIANTS:-attention=cudnn}"
[ "${#VARIANTS[@]}" -gt 0 ] && TRAIN_ARGS+=(--haina-variants "${VARIANTS[@]}")

part 1_env "${T_ENV:-30}" bash -c "
    nvidia-smi || echo 'nvidia-smi: not available'
    $PY -c 'import platform, torch, transformers
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"transformers\", transformers.__version__)
print(\"device:\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA\")'
    git log -1 --format='commit %H %s' 2>/dev/null || echo 'commit: no .git in this copy'
    nproc; free -g | head -2"

part 2_graphs "${T_GRAPHS:-180}" "$PY" benchmarks/decode_graphs.py "${GRAPH_ARGS[@]}"

part 3_generate "${T_GEN:-80}" "$PY" benchmarks/generate.py --device "$DEVICE" "${GEN_ARGS[@]}"

if [ -f "$NANOGPT/model.py" ]; then
    part 4_train "${T_TRAIN:-280}" "$PY" benchmarks/train_throughput.py --nanogpt "$NANOGPT" --device "$DEVICE" \
        "${TRAIN_ARGS[@]}"
else
    echo "-- 4_train: skipped: no nanoGPT checkout at $NANOGPT (carry .cache/nanogpt)" | tee "$OUT/4_train.txt"
fi

if [ "${FT:-0}" = 1 ]; then
    part 5_finetune "${T_FT:-90}" "$PY" benchmarks/finetune.py --device "$DEVICE" "${FT_ARGS[@]}"
fi
[ "${GQA:-0}" = 1 ] && part 6_gqa "${T_GQA:-40}" "$PY" - <<'EOF'
import time

import torch
import torch.nn.functional as F

dev = "cuda" if torch.cuda.is_available() else "cpu"
reps, big, long = (50, 64, 1024) if dev == "cuda" else (2, 4, 128)  # SMOKE on a CPU: small shapes
print(f"SDPA on {torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}: grouped heads (enable_gqa) against "
      f"copied ones (repeat_interleave), 32 query and 8 key/value heads of 64, median of {reps} calls")
print("| call | dtype | copied, us | enable_gqa, us | gqa / copied |\n|---|---|---:|---:|---:|")
cases = [(f"decode, batch 1, {long} cached", 1, 1, long, False),
         (f"decode, batch {big}, {long} cached", big, 1, long, False),
         (f"decode, batch {big}, {long} cached, mask", big, 1, long, True),
         (f"prefill 1 x {long}, causal", 1, long, long, False)]
for name, B, T, S, masked in cases:
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(B, 32, T, 64, device=dev, dtype=dtype)
        k, v = (torch.randn(B, 8, S, 64, device=dev, dtype=dtype) for _ in range(2))
        mask = torch.ones(B, 1, T, S, dtype=torch.bool, device=dev) if masked else None
        causal = T > 1 and mask is None

        def copied():
            return F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                  attn_mask=mask, is_causal=causal)

        def grouped():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)

        us = []
        for fn in (copied, grouped):
            for _ in range(3):
                fn()
            times = []
            for _ in range(reps):
                if dev == "cuda":
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    torch.cuda.synchronize()
                    times.append(a.elapsed_time(b) * 1000)
                else:
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e6)
            us.append(sorted(times)[len(times) // 2])
        print(f"| {name} | {str(dtype).split('.')[1]} | {us[0]:,.0f} | {us[1]:,.0f} | {us[1] / us[0]:.2f} |",
              flush=True)
EOF

echo "== session done in $(( $(date +%s) - SESSION_START )) s; tables in $OUT: $(ls "$OUT" | tr '\n' ' ')"
