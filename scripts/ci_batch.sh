#!/usr/bin/env bash
# liftq CI batch: quantize (from a recipe) -> eval -> pack -> push, every step with --json.
#
# Usage: scripts/ci_batch.sh MODEL RECIPE REPO [WORK_DIR]
#   MODEL     the model to quantise: alias (smollm2-135m), HF folder, .gguf file or hub id
#   RECIPE    recipe YAML (recipes/*.yaml, or `liftq plan --write-recipe FILE`)
#   REPO      Hub repo to push to (user/name); the token comes from HF_TOKEN or `hf auth login`
#   WORK_DIR  outputs: quantized/, packed/ and one JSON file per step (default: liftq-ci)
#
# Environment (all optional):
#   LIFTQ          how to run liftq (default: liftq)
#   QUANTIZE_ARGS  extra `liftq quantize` arguments, e.g. "--nsamples 32"
#   EVAL_ARGS      `liftq eval` arguments (default: --ppl wikitext2 --ctx 1024 --max-tokens 40960)
#   KLD_REF        reference model for KL divergence and top-1 agreement (default: MODEL;
#                  set it to an empty string to skip)
#   PACK_ARGS      extra `liftq pack` arguments, e.g. "--dtype bfloat16"
#   PUSH_ARGS      extra `liftq push` arguments, e.g. "--private --revision lq-2.3"
#   DRY_RUN=1      push with --dry-run: prints the card, needs no token (pull requests)
#
# Each step's JSON goes to WORK_DIR/<step>.json (quantize.json holds one JSON event per block,
# then the summary object). The script stops at the first failing step and exits with its
# code, and prints one JSON summary line on stdout either way:
#   0 ok | 1 internal error | 2 bad input | 3 does not fit | 4 resource or network failure
# (2 also for a wrong invocation of this script).
set -uo pipefail

if [ $# -lt 3 ] || [ $# -gt 4 ]; then
    echo "usage: $0 MODEL RECIPE REPO [WORK_DIR]" >&2
    printf '{"ok": false, "failed_step": "usage", "exit_code": 2}\n'
    exit 2
fi
MODEL=$1
RECIPE=$2
REPO=$3
WORK=${4:-liftq-ci}
read -r -a LIFTQ_CMD <<< "${LIFTQ:-liftq}"
read -r -a QUANTIZE_EXTRA <<< "${QUANTIZE_ARGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:---ppl wikitext2 --ctx 1024 --max-tokens 40960}"
read -r -a PACK_EXTRA <<< "${PACK_ARGS:-}"
read -r -a PUSH_EXTRA <<< "${PUSH_ARGS:-}"
KLD_REF=${KLD_REF-$MODEL}

json_string() {  # a JSON string literal (escapes backslashes and double quotes)
    local s=${1//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}

step() {  # step NAME ARGS...: run `liftq ARGS... --json`, output to WORK/NAME.json
    local name=$1
    shift
    echo "[ci_batch] $name: liftq $*" >&2
    # Written aside and moved into place: WORK/NAME.json is never a half-written or empty file.
    "${LIFTQ_CMD[@]}" "$@" --json > "$WORK/$name.json.part"
    local code=$?
    if [ "$code" -ne 0 ]; then
        if [ ! -s "$WORK/$name.json.part" ]; then  # it died before printing its JSON error
            printf '{"error": "liftq %s exited with code %d and printed nothing", "exit_code": %d}\n' \
                "$name" "$code" "$code" > "$WORK/$name.json.part"
        fi
        mv -f "$WORK/$name.json.part" "$WORK/$name.json"
        echo "[ci_batch] $name failed with exit code $code; its output: $WORK/$name.json" >&2
        printf '{"ok": false, "failed_step": "%s", "exit_code": %d, "output": %s}\n' \
            "$name" "$code" "$(json_string "$WORK/$name.json")"
        exit "$code"
    fi
    mv -f "$WORK/$name.json.part" "$WORK/$name.json"
}

# The repo name is checked before hours of quantization, with the Hub's rules for repo ids.
if ! [[ "$REPO" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
    || [[ "$REPO" == *--* || "$REPO" == *..* || "$REPO" == *[-.] || "$REPO" == *[-.]/* ]] \
    || [ ${#REPO} -gt 96 ]; then
    echo "error: REPO '$REPO' is not a Hub repo id: use namespace/name (letters, digits, -, _, .)" >&2
    printf '{"ok": false, "failed_step": "repo", "exit_code": 2, "error": %s}\n' \
        "$(json_string "REPO '$REPO' is not a Hub repo id: use namespace/name")"
    exit 2
fi

mkdir -p "$WORK" || exit 4

KLD=()
if [ -n "$KLD_REF" ]; then
    KLD=(--kld-ref "$KLD_REF")
fi
PUSH_MODE=()
if [ "${DRY_RUN:-0}" = "1" ]; then
    PUSH_MODE=(--dry-run)
fi

# WORK is this script's own folder: a re-run replaces its earlier outputs (quantize resumes
# from its work dir); liftq still refuses a WORK/quantized or WORK/packed it did not write.
step quantize quantize "$MODEL" --recipe "$RECIPE" --out "$WORK/quantized" --overwrite \
    ${QUANTIZE_EXTRA[@]+"${QUANTIZE_EXTRA[@]}"}
step eval eval "$WORK/quantized" ${EVAL_EXTRA[@]+"${EVAL_EXTRA[@]}"} ${KLD[@]+"${KLD[@]}"}
step pack pack "$WORK/quantized" --out "$WORK/packed" --overwrite ${PACK_EXTRA[@]+"${PACK_EXTRA[@]}"}
step push push "$WORK/packed" --repo "$REPO" --eval-json "$WORK/eval.json" \
    ${PUSH_MODE[@]+"${PUSH_MODE[@]}"} ${PUSH_EXTRA[@]+"${PUSH_EXTRA[@]}"}

printf '{"ok": true, "exit_code": 0, "repo": %s, "work_dir": %s, "dry_run": %s}\n' \
    "$(json_string "$REPO")" "$(json_string "$WORK")" \
    "$([ "${DRY_RUN:-0}" = "1" ] && echo true || echo false)"
