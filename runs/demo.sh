#!/usr/bin/env bash
# lmforge, every stage in order on a CPU. `make demo` runs this inside the project's .venv.
# Each stage reads what the previous one wrote; outputs land in $DEMO_DIR (default: out/demo).
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-out/demo}
mkdir -p "$DEMO_DIR"
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")

echo "== 1. Tokenizer: train byte-level BPE on the Python standard library's own source"
mapfile -t SOURCES < <(python -c "from lmforge.assets import stdlib_source_files as f; print(*f(), sep='\n')")
lmforge tokenizer train --input "${SOURCES[@]}" --vocab-size 8192 \
    --special "<|endoftext|>" --out "$DEMO_DIR/tokenizer"

echo "== 1b. Fertility on a file it saw (argparse.py) and a GPT-4 comparison (cl100k_base, fetched once into ~/.cache/lmforge)"
lmforge tokenizer stats --tokenizer "$DEMO_DIR/tokenizer" --file "$STDLIB/argparse.py" --plot "$DEMO_DIR/token_lengths.png"
lmforge tokenizer stats --tokenizer cl100k_base --file "$STDLIB/argparse.py" --json \
    | python -c "import json,sys; s=json.load(sys.stdin); print(f'cl100k_base on argparse.py: {s[\"bytes_per_token\"]:.2f} bytes/token')"

echo "== 1c. Round trip (special-token text stays text unless allowed)"
TEXT='def greet(name):  # héllo 世界 🤖
    return f"hi {name}"<|endoftext|>'
IDS=$(lmforge tokenizer encode --tokenizer "$DEMO_DIR/tokenizer" --text "$TEXT")
echo "ids: $IDS"
BACK=$(lmforge tokenizer decode --tokenizer "$DEMO_DIR/tokenizer" --ids "$IDS")
[ "$BACK" == "$TEXT" ] && echo "round trip OK: $(echo "$IDS" | tr ',' '\n' | wc -l) tokens for ${#TEXT} characters"
echo "with --allow-special: $(lmforge tokenizer encode --tokenizer "$DEMO_DIR/tokenizer" --text "$TEXT" --allow-special | tr ',' '\n' | tail -1) is <|endoftext|>"

echo "== 2. Pretrain a small Llama on the same source for a few minutes (2 CPU cores; resumable with --resume)"
lmforge pretrain --data "${SOURCES[@]}" --tokenizer "$DEMO_DIR/tokenizer" --depth 4 --out "$DEMO_DIR/model" \
    --time-budget "${PRETRAIN_BUDGET:-4m}" --batch-size 16 --seq-len 128 --eval-every 100 --save-every 100 \
    --eval-tokens 65536
echo "loss curve: $DEMO_DIR/model/loss.png (metrics: $DEMO_DIR/model/metrics.jsonl)"

echo "== 2b. Validation perplexity, next to a unigram baseline (token frequencies of the training split)"
lmforge eval perplexity --model "$DEMO_DIR/model" --data "$DEMO_DIR/model/data" --json | python -c "
import json, sys
s = json.load(sys.stdin)
meta = json.load(open('$DEMO_DIR/model/lmforge.json'))
base = meta['metrics']['unigram_perplexity']
print(f'model perplexity {s[\"perplexity\"]:.1f} vs unigram baseline {base:.1f} ({base / s[\"perplexity\"]:.1f}x better)')"

echo "== 2c. Generate (greedy with a repetition penalty, then sampled with a seed)"
lmforge generate --model "$DEMO_DIR/model" --prompt "def " --max-new-tokens 48 --temperature 0 --repetition-penalty 1.3
lmforge generate --model "$DEMO_DIR/model" --prompt "import os" --max-new-tokens 48 --temperature 0.8 \
    --top-p 0.95 --seed 0

echo "demo finished: outputs in $DEMO_DIR"
