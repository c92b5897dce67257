# Sourced by scripts/serve and scripts/test: make .venv and install the package
# into it, again only when pyproject.toml has changed since the last install.
# Usage: ensure_venv ""        (runtime)   |   ensure_venv "[test]"   (with test extras)

find_python() {
    local candidate
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "runbox-mta needs Python 3.11 or newer (apt-get install python3)" >&2
    return 1
}

ensure_venv() {
    local extras="$1" python stamp wanted
    if [ ! -x .venv/bin/python ]; then
        python=$(find_python) || exit 1
        if ! "$python" -m venv .venv; then
            echo "could not create .venv: on Debian/Ubuntu, apt-get install python3-venv" >&2
            rm -rf .venv
            exit 1
        fi
    fi
    stamp=".venv/.installed${extras}"
    wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet --editable ".${extras}"
        echo "$wanted" >"$stamp"
    fi
}
