#!/usr/bin/env bash
# Counts the crate's public API as `cargo doc` (default features) lists it: the structs, enums,
# unions, traits, functions, constants, statics, type aliases and macros on
# target/doc/candle_mha/all.html ("List of all items"; `#[doc(hidden)]` items, methods and modules
# are not on it). Prints the list, then the count. Issue 30's target: at most 40.
#
#   bash scripts/count-public-api.sh            # build the docs, list, count
#   bash scripts/count-public-api.sh --max 40   # also fail when the count is over 40
set -euo pipefail
cd "$(dirname "$0")/.."

max=""
if [[ ${1:-} == --max ]]; then
    max=${2:?"--max needs a number"}
fi

cargo doc --no-deps --quiet
target=${CARGO_TARGET_DIR:-target}
all="$target/doc/candle_mha/all.html"
if [[ ! -f $all ]]; then
    echo "error: $all not found" >&2
    exit 1
fi

# all.html: <h3 id="structs">Structs</h3><ul class="all-items"><li><a href="...">path</a></li>...</ul>
list=$(python3 - "$all" <<'PY'
import re, sys
html = open(sys.argv[1], encoding="utf-8").read()
kinds = {"structs", "enums", "unions", "traits", "trait-aliases", "functions", "constants",
         "statics", "types", "macros", "attributes", "derives", "foreign-types"}
for m in re.finditer(r'<h3 id="([a-z-]+)">[^<]*</h3><ul class="all-items">(.*?)</ul>', html, re.S):
    kind = m.group(1)
    if kind not in kinds:
        continue
    for item in re.findall(r'<li><a href="[^"]*">(.*?)</a></li>', m.group(2)):
        item = re.sub(r"<[^>]+>", "", item)
        print(f"{kind.rstrip('s')}\t{item}")
PY
)
echo "$list" | awk -F'\t' '{ printf "%-9s %s\n", $1, $2 }'
count=$(echo "$list" | grep -c . || true)
echo "public items (default features, doc(hidden) excluded): $count"
if [[ -n $max ]] && ((count > max)); then
    echo "error: $count public items, more than $max" >&2
    exit 1
fi
