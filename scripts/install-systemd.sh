#!/usr/bin/env bash
# Render the systemd units for this checkout, install and enable them.
#
#   scripts/install-systemd.sh [options] [manager] [proxy]
#
# Roles (default: both): `manager` is the Telegram bot + hub, `proxy` runs
# Codex on this machine. The units come from systemd/*.service.in with this
# checkout's real paths filled in (docs/OPERATIONS.md explains them).
#
#   --root DIR             write the units under DIR/etc/systemd/system/ and touch
#                          nothing else (for packagers and for review)
#   --dry-run              print the rendered units; touch nothing
#   --manager-config PATH  the manager's config (default: <checkout>/codex_config.json)
#   --proxy-config PATH    the proxy's config (default: <checkout>/proxy_config.json)
#   --user NAME            the manager's service user (default: codexnet)
#   --create-user          create that user (a system user, no shell) if it is missing
#   --proxy-user NAME      the user Codex runs as (default: the one who ran sudo)
#   --now                  also start (or restart) the units
#
# Configs are handed to the services as systemd credentials (LoadCredential=):
# they can stay root-only (mode 0600) and no secret is ever in a unit file.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prog="install-systemd.sh"
die() { echo "$prog: $*" >&2; exit 2; }
note() { echo "$prog: $*" >&2; }

target="" dry_run=0 start=0 create_user=0
manager_user="codexnet" proxy_user=""
manager_config="$root/codex_config.json" proxy_config="$root/proxy_config.json"
roles=()
while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; target="$2"; shift ;;
        --root=*) target="${1#*=}" ;;
        --dry-run) dry_run=1 ;;
        --manager-config) [ $# -ge 2 ] || die "--manager-config needs a path"; manager_config="$2"; shift ;;
        --proxy-config) [ $# -ge 2 ] || die "--proxy-config needs a path"; proxy_config="$2"; shift ;;
        --user) [ $# -ge 2 ] || die "--user needs a name"; manager_user="$2"; shift ;;
        --create-user) create_user=1 ;;
        --proxy-user) [ $# -ge 2 ] || die "--proxy-user needs a name"; proxy_user="$2"; shift ;;
        --now) start=1 ;;
        manager|proxy) roles+=("$1") ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
[ ${#roles[@]} -gt 0 ] || roles=(manager proxy)
has_role() { local r; for r in "${roles[@]}"; do [ "$r" = "$1" ] && return 0; done; return 1; }
live=1
{ [ -n "$target" ] || [ "$dry_run" = 1 ]; } && live=0

absolute() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$PWD" "$1" ;; esac; }
manager_config="$(absolute "$manager_config")"
proxy_config="$(absolute "$proxy_config")"

# Unit files treat %, quotes, backslashes and whitespace specially: refuse such
# paths rather than render a unit that means something else.
plain_path() {
    case "$1" in
        *[[:space:]%\"\'\\\$]*) die "$2 $1: paths with spaces, %, quotes, \\ or \$ are not supported in units" ;;
    esac
}

python="$root/.venv/bin/python"
[ -x "$python" ] || die "$python not found: run ./scripts/install.sh first"
plain_path "$root" "the checkout"
plain_path "$manager_config" "--manager-config"
plain_path "$proxy_config" "--proxy-config"

# ------------------------------------------------------------------ manager paths

# ProtectHome= hides /home and /root. When the checkout or the venv's Python
# lives there, hide them behind an empty tmpfs and bind back only those trees.
manager_protect_home() {
    local base paths=() path
    base="$("$python" -c 'import sys; print(sys.base_prefix)')"
    for path in "$root" "$base"; do
        case "$path" in /home/*|/root|/root/*|/run/user/*) paths+=("$path") ;; esac
    done
    if [ ${#paths[@]} -eq 0 ]; then
        echo "ProtectHome=yes"
    else
        for path in "${paths[@]}"; do plain_path "$path" "a path the manager reads,"; done
        echo "ProtectHome=tmpfs"
        echo "BindReadOnlyPaths=${paths[*]}"
    fi
}

# ------------------------------------------------------------------ proxy paths

if has_role proxy; then
    if [ -z "$proxy_user" ]; then
        proxy_user="${SUDO_USER:-}"
        [ -n "$proxy_user" ] || [ ! -e "$proxy_config" ] || proxy_user="$(stat -c %U "$proxy_config")"
        [ -n "$proxy_user" ] || proxy_user="$(id -un)"
        if [ "$proxy_user" = root ] && [ "$live" = 1 ]; then
            die "Codex would run as root; pass --proxy-user NAME (or --proxy-user root if you mean it)"
        fi
    fi
    proxy_home="$(getent passwd "$proxy_user" | cut -d: -f6 || true)"
    if [ -z "$proxy_home" ]; then
        [ "$live" = 0 ] || die "user $proxy_user does not exist"
        proxy_home="/home/$proxy_user"
    fi
    plain_path "$proxy_home" "the home of $proxy_user,"
    # Codex writes its home (CODEX_HOME, caches), codex_cwd and the other
    # allowed_roots (a conversation can /cd there, and sent files land there);
    # nothing else.
    proxy_rw="$proxy_home"
    if [ -r "$proxy_config" ]; then
        dirs="$("$python" - "$proxy_config" <<'PY' 2>/dev/null || true
import sys
from pathlib import Path
from codexnet.config import load_proxy_config
config = load_proxy_config(Path(sys.argv[1]), env={})
for path in dict.fromkeys([config.codex_cwd, *config.allowed_roots]):
    print(path)
PY
)"
        while IFS= read -r dir; do
            [ -n "$dir" ] || continue
            plain_path "$dir" "codex_cwd or allowed_roots"
            case "$dir/" in "$proxy_home"/*) ;; *) proxy_rw="$proxy_rw $dir" ;; esac
        done <<< "$dirs"
    fi
fi

# ------------------------------------------------------------------ render

render() {  # render TEMPLATE: the unit on stdout
    local line
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line//@ROOT@/$root}"
        line="${line//@PYTHON@/$python}"
        line="${line//@MANAGER_USER@/$manager_user}"
        line="${line//@MANAGER_CONFIG@/$manager_config}"
        line="${line//@PROXY_USER@/${proxy_user:-}}"
        line="${line//@PROXY_CONFIG@/$proxy_config}"
        line="${line//@PROXY_RW_PATHS@/${proxy_rw:-}}"
        line="${line//@CODEX_BIN_DIR@/$root/.tools/codex/node_modules/.bin}"
        if [ "$line" = "@PROTECT_HOME@" ]; then
            manager_protect_home
        else
            printf '%s\n' "$line"
        fi
    done < "$1"
}

units=()
has_role manager && units+=(codexnet-manager.service)
has_role proxy && units+=(codexnet-proxy.service)

if [ "$dry_run" = 1 ]; then
    for unit in "${units[@]}"; do
        echo "# /etc/systemd/system/$unit"
        render "$root/systemd/$unit.in"
        echo
    done
    exit 0
fi

if [ -n "$target" ]; then
    mkdir -p "$target/etc/systemd/system"
    for unit in "${units[@]}"; do
        render "$root/systemd/$unit.in" > "$target/etc/systemd/system/$unit"
        chmod 0644 "$target/etc/systemd/system/$unit"
        echo "$target/etc/systemd/system/$unit"
    done
    exit 0
fi

# ------------------------------------------------------------------ the real thing

[ "$(id -u)" = 0 ] || die "installing units needs root (try sudo, or --root DIR / --dry-run)"
command -v systemctl >/dev/null || die "systemctl not found: is this a systemd machine?"
for unit in "${units[@]}"; do
    case "$unit" in
        codexnet-manager.service) config="$manager_config" flag="--manager-config" ;;
        *) config="$proxy_config" flag="--proxy-config" ;;
    esac
    [ -f "$config" ] || die "$config not found: create it first (python -m codexnet.manager --init), or pass $flag"
    mode="$(stat -c %a "$config")"
    case "$mode" in *00) ;; *) note "warning: $config is mode $mode; it holds secrets: chmod 600 it" ;; esac
done
if has_role manager && ! getent passwd "$manager_user" >/dev/null; then
    [ "$create_user" = 1 ] || die "user $manager_user does not exist: pass --create-user, or --user NAME"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$manager_user"
    note "created the system user $manager_user"
fi

staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT
for unit in "${units[@]}"; do
    render "$root/systemd/$unit.in" > "$staging/$unit"
done
if command -v systemd-analyze >/dev/null; then
    (cd "$staging" && systemd-analyze verify "${units[@]/#/./}") || die "the rendered units do not verify"
fi
for unit in "${units[@]}"; do
    install -m 0644 "$staging/$unit" "/etc/systemd/system/$unit"
    echo "/etc/systemd/system/$unit"
done
systemctl daemon-reload
systemctl enable "${units[@]}"
if [ "$start" = 1 ]; then
    systemctl restart "${units[@]}"
    note "started: ${units[*]} (journalctl -u ${units[0]} -f)"
else
    note "enabled; start with: systemctl start ${units[*]}"
fi
