#!/usr/bin/env bash
# Every GPU check of kvtier in one command, bounded to 8 minutes in all (it fits on one NVIDIA H200):
#
#   setup    install what the machine lacks from wheels in .whl/ (no network needed), make kvtier importable
#            (kvtier.kernels included), and stop at once if torch sees no CUDA device
#   tests    pytest -m gpu: the CUDA-only paths (device pool on the GPU, pinned host memory, exact parity,
#            side-stream uploads, the offloaded-cache baseline, TIM's span removal turning keys on the GPU and
#            in pinned memory, xgrammar masking CUDA logits when its wheel is in .whl/) and the Triton kernels
#            compiled for real against their references (TRITON_INTERPRET unset)
#   kernels  kvtier bench kernels: each Triton kernel timed against its torch reference at Llama-3-8B's
#            attention shape (32 query / 8 KV heads of 128, bf16) for 32k, 64k and 128k tokens -> kernels-cuda.json
#   exact    kvtier bench exact --device cuda --shapes llama3-8b at 32k and 64k tokens: kvtier.prefill in
#            segments (fused CUDA attention with its log-sum-exp) and exact decode against StaticCache,
#            DynamicCache and DynamicCache(offloading=True), all on the GPU -> exact-llama3-8b-cuda.json (+ .png)
#   speed    kvtier bench speed --device cuda --shape llama3-8b at 32k, 64k and 128k tokens: DynamicCache on the
#            GPU, transformers' offloaded DynamicCache and kvtier (shared-tiered, 24 GiB card emulated)
#            -> speed-llama3-8b-cuda.json (+ .png)
#   hogwild  (not in the default steps; run on its own, see below) kvtier bench hogwild --device cuda --shape
#            llama3-8b: N = 1, 2, 4, 8 workers over one 16k-token prompt, HogwildCache against N independent
#            StaticCache decodes and the re-rotating baseline -> hogwild-llama3-8b-cuda.json (+ .png)
#   profile  (not in the default steps) scripts/gpu_profile.py: where kvtier's time goes on the GPU at 32k
#            tokens on the Llama-3-8B shape cut to 4 layers (prefill segments and decode steps beside
#            DynamicCache and StaticCache, and HogwildCache steps of 4 workers over 16k tokens: top operations,
#            top Python functions, every device sync by the line that asked for it; one-shot prefill memory;
#            logit parity in bf16 and fp32) -> profile-llama3-8b-cuda.json
#
# Usage:  bash scripts/gpu_check.sh              on the GPU machine, from anywhere
#         bash scripts/gpu_check.sh --cpu-smoke  every step's command on the CPU with tiny shapes (also
#                                                GPU_CHECK_DRY_RUN=1): checks the plumbing, measures nothing
# Results: docs/benchmarks/{kernels-cuda.json,exact-llama3-8b-cuda.{json,png},speed-llama3-8b-cuda.{json,png},
# gpu-check.log};
# with OUT set, they are bundled (flat, with the pytest report gpu-check-pytest.xml) into
# OUT/gpu-check-results.tar.gz, and the log is copied beside it.
# A CPU smoke run writes to a temporary folder instead, never to docs/benchmarks.
#
# Time: each step runs under `timeout`; all of them share one deadline (GPU_CHECK_LIMIT_S, 480 s) and the speed
# step, the last, gets whatever the others left. Estimates for one H200, not measurements: setup 15-25 s;
# tests 60-120 s (CUDA start-up and ~30 Triton compiles); kernels 25-45 s; exact 60-120 s (two random-weight
# 8B models on the GPU, four one-shot or segmented prefills per context at ~1-2 s (32k) and ~4-8 s (64k), nine
# decode steps each; capped at 150 s); speed ~20 s to build the two
# random-weight 8B models, then per context mostly CPU work: the prefill on the GPU (~1-2 s at 32k, ~15-25 s at
# 128k: 4.5 PFLOP of causal attention and 2 PFLOP of matmuls), saving the KV to the store (128 KiB per token,
# 16 GiB at 128k, zstd on one thread at 0.12-0.3 GB/s: 1-2.5 min at 128k) and reading it back for the kvtier
# configuration (~0.6 GB/s: ~30 s at 128k). Hence one kvtier configuration and 5 timed decode steps (after 2
# warm-up steps). 32k and 64k fit (~2-3.5 min together); 128k (~3-5 min on its own) probably does not fit
# after the other steps. The speed step skips a context that the previous one's time says would not finish
# (--time-limit; the JSON lists it under skipped_contexts) and rewrites its JSON after every context, so what
# was measured is kept. Then measure 128k alone, within the same 8 minutes, into speed-llama3-8b-cuda-128k.json:
#     GPU_CHECK_STEPS=speed GPU_CHECK_CONTEXTS=131072 bash scripts/gpu_check.sh
# The hogwild step would take the speed step's time, so it runs in a call of its own (capped at 300 s):
#     GPU_CHECK_STEPS=hogwild bash scripts/gpu_check.sh
# Estimate for it, not a measurement: ~30 s to build the two random-weight 8B models, one 16k prefill for the
# independent runs and two per worker count (Hogwild and the baseline; ~1-2 s each), 3 + 16 decode steps per
# method and worker count (under 0.2 s each, the baseline at N = 8 the slowest), Triton compiles ~20 s. Every
# worker count's caches are held at once (they take turns at each step): ~54 GiB of KV at 16k tokens (15
# prompt copies for the independent runs, 4 for Hogwild, 8 for the baseline) beside the two models' 30 GiB of
# weights; 32k would not fit in an H200's 139 GiB.
#
# Environment:
#   GPU_CHECK_STEPS      steps to run after setup (default "tests kernels exact speed"; also "hogwild",
#                        "profile")
#   GPU_CHECK_LIMIT_S    deadline for the whole script in seconds (default 480)
#   GPU_CHECK_CONTEXTS   contexts of the kernels and speed steps (default "32768 65536 131072")
#   GPU_CHECK_CONFIGS    kvtier configurations of the speed step (default "shared-tiered")
#   GPU_CHECK_PYTHON     the Python that has torch (default python3)
#   GPU_CHECK_WHEELS     folder of wheels to install when missing (default .whl in the repository root)
#   GPU_CHECK_INSTALL    how to make kvtier importable: auto (editable pip install, else a linked source
#                        tree; default), pip, or link
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

DRY=0
case "${GPU_CHECK_DRY_RUN:-0}" in 1 | true | yes) DRY=1 ;; esac
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke | --dry-run) DRY=1 ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

PY="${GPU_CHECK_PYTHON:-python3}"
LIMIT_S="${GPU_CHECK_LIMIT_S:-480}"
STEPS="${GPU_CHECK_STEPS:-tests kernels exact speed}"
DEFAULT_CONTEXTS="32768 65536 131072"
CONTEXTS="${GPU_CHECK_CONTEXTS:-$DEFAULT_CONTEXTS}"
CONFIGS="${GPU_CHECK_CONFIGS:-shared-tiered}"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.whl}"
INSTALL="${GPU_CHECK_INSTALL:-auto}"

# ------------------------------------------------------------------------------------------------- setup
# Wheels are installed with --target into a scratch folder on PYTHONPATH, each only if its distribution is
# missing or at another version; setuptools (for the editable install's build backend) only if the machine's is older than 77.
# kvtier itself: `pip install -e .` (no index, no build isolation, no dependencies), which maps kernels/ to
# kvtier.kernels through pyproject's package-dir; if that cannot write to the environment, a linked source
# tree (kvtier/ with kernels/ linked in as kvtier/kernels) on PYTHONPATH does the same.
setup() {
    local site="$WORK/site" build="$WORK/build" src="$WORK/src"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda)' || {
        echo "setup: $PY cannot import torch"
        return 1
    }
    if [ "$DRY" = 0 ]; then
        command -v nvidia-smi >/dev/null && nvidia-smi -L
        if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
            echo "setup: torch sees no CUDA device (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset})."
            echo "setup: this script checks GPU paths; on a machine without a GPU run it with --cpu-smoke"
            return 3
        fi
    fi
    local missing=() whl dist
    for whl in "$WHEELS"/*.whl; do
        [ -f "$whl" ] || continue
        dist="$(basename "$whl")"
        local version="${dist#*-}"
        version="${version%%-*}"
        dist="${dist%%-*}"
        [ "$dist" = setuptools ] && continue
        # Installed when missing or at another version (transformers is pinned for the tests in CI).
        if ! "$PY" -c 'import sys; from importlib import metadata; sys.exit(metadata.version(sys.argv[1]) != sys.argv[2])' \
            "$dist" "$version" 2>/dev/null; then
            missing+=("$whl")
        fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "setup: installing ${missing[*]##*/}"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "${missing[@]}" || return 1
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$PY" -c 'import lmdb, xxhash, zstandard' || {
        echo "setup: lmdb, xxhash or zstandard is missing and $WHEELS has no wheel for them"
        return 1
    }

    if "$PY" - "$ROOT" <<'EOF' 2>/dev/null; then
import sys
from pathlib import Path
import kvtier.kernels
sys.exit(0 if Path(kvtier.kernels.__file__).resolve().parent == Path(sys.argv[1]) / "kernels" else 1)
EOF
        echo "setup: kvtier from $ROOT is importable already"
    else
        local how="$INSTALL" ok=1
        if [ "$how" != link ]; then
            local buildpath=""
            if ! "$PY" -c 'import sys, setuptools; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
                local st=""
                for st in "$WHEELS"/setuptools-*.whl; do [ -f "$st" ] && break; done
                if [ -f "$st" ]; then
                    echo "setup: the build backend uses ${st##*/} (the environment's setuptools is missing or older than 77)"
                    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$build" "$st" &&
                        buildpath="$build"
                fi
            fi
            echo "setup: pip install --no-index --no-deps --no-build-isolation -e $ROOT"
            PYTHONPATH="${buildpath:+$buildpath:}${PYTHONPATH:-}" "$PY" -m pip install -q --no-index --no-deps \
                --no-build-isolation --no-cache-dir -e "$ROOT" && ok=0
            [ "$ok" = 0 ] || [ "$how" = pip ] || echo "setup: editable install failed; linking the source tree instead"
        fi
        if [ "$ok" != 0 ] && [ "$how" != pip ]; then
            mkdir -p "$src" && cp -rs "$ROOT/kvtier" "$src/" && ln -sfn "$ROOT/kernels" "$src/kvtier/kernels" &&
                export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" && ok=0
            echo "setup: kvtier linked from $src (kvtier/kernels -> $ROOT/kernels)"
        fi
        [ "$ok" = 0 ] || return 1
    fi
    echo "${PYTHONPATH:-}" >"$WORK/pythonpath"
    # The facts every result depends on, and the package layout the tests rely on.
    "$PY" - "$ROOT" <<'EOF'
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import torch

import kvtier.kernels

root = Path(sys.argv[1])
kernels_dir = Path(kvtier.kernels.__file__).resolve().parent
assert kernels_dir == root / "kernels", f"kvtier.kernels comes from {kernels_dir}, not {root / 'kernels'}"
assert importlib.util.find_spec("kernels") is None, "a top-level `kernels` package is importable"
versions = {}
for dist in ("torch", "transformers", "triton", "numpy", "lmdb", "xxhash", "zstandard", "pytest", "hypothesis"):
    try:
        versions[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        versions[dist] = None
print("setup:", ", ".join(f"{k} {v}" for k, v in versions.items()))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"setup: GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, CUDA {torch.version.cuda}")
major, minor = (int(x) for x in versions["transformers"].split(".")[:2])
if not (5, 4) <= (major, minor) < (5, 40):
    print(f"setup: warning: transformers {versions['transformers']} is outside kvtier's range (>=5.4,<5.40)")
EOF
}

# The setup step runs as a child of this script (under `timeout`, like every step); it hands PYTHONPATH back
# through a file in the work folder.
if [ -n "${_GPU_CHECK_SETUP_WORK:-}" ]; then
    WORK="$_GPU_CHECK_SETUP_WORK"
    cd "$WORK" || exit 2
    setup
    exit $?
fi

RESERVE_S=20 # kept back at the deadline: the grace period of a killed step, the summary and the copies
START_S=$(date +%s)
DEADLINE_S=$((START_S + LIMIT_S))

WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvtier-gpu-check.XXXXXX")"
STAMP="$WORK/.started"
touch -d "@$START_S" "$STAMP"
# Every command runs from the work folder, never from the repository root: there `python -m` would put the
# root on sys.path, and with it kvtier's source `kernels/` as a top-level package `kernels` (a name
# transformers probes for the Hugging Face kernel hub) and kvtier/ without its kernels.
cd "$WORK" || exit 2
# Results of other contexts than the default ones get their own names (speed-llama3-8b-cuda-128k.json for
# GPU_CHECK_CONTEXTS=131072), so a second run never overwrites the first one's.
SUFFIX=""
if [ "$CONTEXTS" != "$DEFAULT_CONTEXTS" ]; then
    for c in $CONTEXTS; do SUFFIX="$SUFFIX-$((c / 1024))k"; done
fi
KERNELS_NAME="kernels-cuda$SUFFIX"
SPEED_NAME="speed-llama3-8b-cuda$SUFFIX"
EXACT_NAME="exact-llama3-8b-cuda"
HOGWILD_NAME="hogwild-llama3-8b-cuda"
if [ "$DRY" = 1 ]; then
    RESULTS="$WORK/results" # a smoke run never touches docs/benchmarks
    KERNELS_NAME="kernels-cpu-smoke"
    EXACT_NAME="exact-llama3-8b-cpu-smoke"
    SPEED_NAME="speed-llama3-8b-cpu-smoke"
    HOGWILD_NAME="hogwild-llama3-8b-cpu-smoke"
else
    RESULTS="$ROOT/docs/benchmarks"
fi
RESULT_FILES=("$RESULTS/profile-llama3-8b-cuda.json" "$RESULTS/$KERNELS_NAME.json" "$RESULTS/$EXACT_NAME.json" "$RESULTS/$EXACT_NAME.png"
    "$RESULTS/$SPEED_NAME.json" "$RESULTS/$SPEED_NAME.png" "$RESULTS/$HOGWILD_NAME.json" "$RESULTS/$HOGWILD_NAME.png")
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu-check.log"
JUNIT="$WORK/gpu-check-pytest.xml"
: >"$LOG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET KVTIER_NO_TRITON # kernels compiled for real; the smoke run sets it per command

SUMMARY=()
FAILED=0
LAST_RC=0

say() { echo "[gpu_check $(($(date +%s) - START_S))s] $*" | tee -a "$LOG"; }

# run_step NAME CAP_S CMD...: run CMD under timeout (at most CAP_S, never past the deadline), log its output,
# record passed / failed / timed out. An argument @LIMIT@ becomes the seconds CMD has, less 20 to finish in.
run_step() {
    local name="$1" cap="$2"
    shift 2
    local left=$((DEADLINE_S - $(date +%s) - RESERVE_S))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        say "$name: skipped, ${left}s left before the deadline"
        SUMMARY+=("$name|skipped (no time left)|0")
        LAST_RC=124
        FAILED=1
        return 0
    fi
    local args=() arg
    for arg in "$@"; do
        [ "$arg" = @LIMIT@ ] && arg=$((limit > 40 ? limit - 20 : 20))
        args+=("$arg")
    done
    say "$name: start (limit ${limit}s): ${args[*]}"
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "${args[@]}" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case "$rc" in
        0) status="passed" ;;
        124 | 137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    LAST_RC=$rc
    [ "$rc" = 0 ] || FAILED=1
    SUMMARY+=("$name|$status|$(($(date +%s) - t0))")
    say "$name: $status"
}

finish() {
    {
        echo
        echo "gpu_check summary ($([ "$DRY" = 1 ] && echo "CPU smoke run: plumbing only, no GPU result" || echo "GPU run"))"
        printf '  %-13s %-32s %s\n' step status seconds
        local row
        for row in "${SUMMARY[@]}"; do
            IFS='|' read -r n s t <<<"$row"
            printf '  %-13s %-32s %s\n' "$n" "$s" "$t"
        done
        echo "  total $(($(date +%s) - START_S))s of ${LIMIT_S}s; results in $RESULTS"
    } | tee -a "$LOG"
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT"
        local f fresh=()
        for f in "${RESULT_FILES[@]}" "$JUNIT"; do
            [ "$f" -nt "$STAMP" ] && fresh+=("$f") # written by this run, not left from an earlier one
        done
        echo "results and log bundled into $OUT/gpu-check-results.tar.gz" | tee -a "$LOG"
        tar -czf "$OUT/gpu-check-results.tar.gz" --transform 's|.*/||' "${fresh[@]}" "$LOG"
        cp "$LOG" "$OUT/"
    fi
    if [ "$DRY" = 1 ]; then
        rm -rf "$WORK/site" "$WORK/build" "$WORK/src" # keep the smoke run's results to look at
    else
        rm -rf "$WORK"
    fi
}

# ------------------------------------------------------------------------------------------------- steps
read -ra CONTEXT_LIST <<<"$CONTEXTS"
read -ra CONFIG_LIST <<<"$CONFIGS"
KERNEL_ARGS=(--contexts "${CONTEXT_LIST[@]}")
# StaticCache's one-shot prefill builds a [Q, K] mask: 128k would need 16 GiB for it alone, so 32k and 64k.
EXACT_ARGS=(--shapes llama3-8b --contexts 32768 65536 --steps 8 --no-reopen)
SPEED_ARGS=(--shape llama3-8b --contexts "${CONTEXT_LIST[@]}" --gpu-memory-gib 24 --host-fraction 1.0
    --configs "${CONFIG_LIST[@]}" --steps 5 --warmup 2)
HOGWILD_ARGS=(--shape llama3-8b --prompt 16384 --workers 1 2 4 8 --steps 16 --warmup 3)
if [ "$DRY" = 1 ]; then
    say "CPU smoke run: each step's command on the CPU with tiny shapes; nothing here is a GPU result"
    KERNEL_ARGS=(--contexts 512 --heads 4 --kv-heads 2 --head-dim 16 --chunk 16 --reps 2 --warmup 1)
    EXACT_ARGS=(--shapes qwen2.5-0.5b --contexts 600 --layers 1 --segment 256 --steps 2 --threads 1)
    SPEED_ARGS=(--shape llama3-8b --contexts 600 700 --layers 2 --kv-heads 2 --head-dim 16 --intermediate 64
        --gpu-memory-gib 1 --reserve-gib 0.1 --host-fraction 1.0 --configs "${CONFIG_LIST[@]}" --steps 2 --warmup 1
        --threads 1)
    HOGWILD_ARGS=(--shape llama3-8b --prompt 256 --workers 1 2 --layers 2 --kv-heads 2 --head-dim 16 --intermediate 64
        --steps 2 --warmup 1 --threads 1)
fi

run_step setup 120 env _GPU_CHECK_SETUP_WORK="$WORK" GPU_CHECK_DRY_RUN="$DRY" bash "$ROOT/scripts/gpu_check.sh"
if [ "$LAST_RC" != 0 ]; then
    say "setup did not pass: nothing else can run"
    finish
    exit 1
fi
PYTHONPATH="$(cat "$WORK/pythonpath")"
export PYTHONPATH
[ -n "$PYTHONPATH" ] || unset PYTHONPATH

for step in $STEPS; do
    case "$step" in
        tests)
            if [ "$DRY" = 1 ]; then
                # Without CUDA every gpu-marked test is skipped: this checks collection and the command line;
                # the kernels are then checked against their references under the Triton interpreter.
                run_step tests 300 env CUDA_VISIBLE_DEVICES= "$PY" -m pytest -m gpu -rA -p no:cacheprovider \
                    --continue-on-collection-errors --junitxml="$JUNIT" "$ROOT/tests"
                run_step tests-interp 300 "$PY" -m pytest -rA -p no:cacheprovider "$ROOT/tests/test_kernels.py" \
                    "$ROOT/tests/test_block_attention.py"
            else
                # A module that fails to import is reported, but does not stop the gpu tests of the others.
                run_step tests 180 "$PY" -m pytest -m gpu -rA -p no:cacheprovider --continue-on-collection-errors \
                    --junitxml="$JUNIT" "$ROOT/tests"
            fi
            ;;
        kernels)
            if [ "$DRY" = 1 ]; then
                run_step kernels 120 env TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= "$PY" -m kvtier.cli bench kernels \
                    --device cpu "${KERNEL_ARGS[@]}" --name "$KERNELS_NAME" --out "$RESULTS"
            else
                run_step kernels 120 "$PY" -m kvtier.cli bench kernels --device cuda "${KERNEL_ARGS[@]}" \
                    --name "$KERNELS_NAME" --out "$RESULTS"
            fi
            ;;
        exact)
            if [ "$DRY" = 1 ]; then
                run_step exact 120 env CUDA_VISIBLE_DEVICES= "$PY" -m kvtier.cli bench exact --device cpu \
                    "${EXACT_ARGS[@]}" --name "$EXACT_NAME" --out "$RESULTS"
            else
                run_step exact 150 "$PY" -m kvtier.cli bench exact --device cuda "${EXACT_ARGS[@]}" \
                    --name "$EXACT_NAME" --out "$RESULTS"
            fi
            ;;
        speed)
            if [ "$DRY" = 1 ]; then
                run_step speed 300 env CUDA_VISIBLE_DEVICES= "$PY" -m kvtier.cli bench speed --device cpu \
                    "${SPEED_ARGS[@]}" --time-limit @LIMIT@ --name "$SPEED_NAME" --out "$RESULTS"
            else
                # --time-limit: a context the previous one's time says would not finish is skipped (and
                # recorded so) instead of being killed half-way.
                run_step speed 600 "$PY" -m kvtier.cli bench speed --device cuda "${SPEED_ARGS[@]}" \
                    --time-limit @LIMIT@ --name "$SPEED_NAME" --out "$RESULTS"
            fi
            if [ "$RESULTS/$SPEED_NAME.json" -nt "$STAMP" ]; then
                SUMMARY+=("  contexts|$("$PY" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("measured", " ".join(str(x["context"]) for x in r["results"]) or "none", "; skipped",
      " ".join(map(str, r.get("skipped_contexts", []))) or "none")' "$RESULTS/$SPEED_NAME.json" 2>&1)|")
            fi
            ;;
        hogwild)
            if [ "$DRY" = 1 ]; then
                run_step hogwild 120 env CUDA_VISIBLE_DEVICES= "$PY" -m kvtier.cli bench hogwild --device cpu \
                    "${HOGWILD_ARGS[@]}" --name "$HOGWILD_NAME" --out "$RESULTS"
            else
                run_step hogwild 300 "$PY" -m kvtier.cli bench hogwild --device cuda "${HOGWILD_ARGS[@]}" \
                    --name "$HOGWILD_NAME" --out "$RESULTS"
            fi
            ;;
        profile)
            if [ "$DRY" = 1 ]; then
                run_step profile 120 "$PY" "$ROOT/scripts/gpu_profile.py" --cpu-smoke --context 1024 --segment 256 \
                    --steps 4 --out "$RESULTS"
            else
                run_step profile 240 "$PY" "$ROOT/scripts/gpu_profile.py" --context 32768 --layers 4 --out "$RESULTS"
            fi
            ;;
        *)
            say "unknown step $step (steps: tests kernels exact speed hogwild profile)"
            SUMMARY+=("$step|unknown step|0")
            FAILED=1
            ;;
    esac
done

finish
exit "$FAILED"
