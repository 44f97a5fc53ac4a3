#!/bin/bash
# Four completions of one 1083-token prompt whose last token changes (the
# next turn of a conversation), each with max_tokens 1, against a fresh
# `bitnet serve` with the given prefix cache: prints each request's wall
# time (curl) and usage. docs/perf/server-loadtest.md, session 36.
# usage: prefix_cache_turns.sh BITNET MODEL CACHE_TOKENS THREADS [PORT]
set -e
BIN=$1; MODEL=$2; CACHE=$3; THREADS=$4; PORT=${5:-8090}
$BIN serve --model $MODEL --threads $THREADS --port $PORT --prefix-cache-tokens $CACHE > ${TMPDIR:-/tmp}/serve_$CACHE.log 2>&1 &
PID=$!
for i in $(seq 1 300); do [ "$(curl -s -o /dev/null -w "%{http_code}" localhost:$PORT/health)" = 200 ] && break; sleep 0.5; done
BASE=$(python3 -c "print(' '.join('word%d is here' % (i % 97) for i in range(160)))")
req() { # prompt max_tokens
  python3 -c "import json,sys; print(json.dumps({'model':'$(basename $MODEL .gguf)','prompt':sys.argv[1],'max_tokens':int(sys.argv[2]),'temperature':0}))" "$1" "$2" > ${TMPDIR:-/tmp}/body.json
  curl -s -o ${TMPDIR:-/tmp}/resp.json -w "%{time_total}" -H 'content-type: application/json' --data @${TMPDIR:-/tmp}/body.json localhost:$PORT/v1/completions
  python3 -c "import json; u=json.load(open('${TMPDIR:-/tmp}/resp.json'))['usage']; print(' prompt', u['prompt_tokens'], 'cached', u['prompt_tokens_details']['cached_tokens'])"
}
echo "cache=$CACHE threads=$THREADS"
for turn in 1 2 3 4; do
  echo -n "turn $turn: "; req "$BASE and question number $turn" 1
done
kill $PID; wait $PID 2>/dev/null
