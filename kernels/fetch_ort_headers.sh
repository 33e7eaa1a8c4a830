#!/usr/bin/env bash
# Find or fetch the onnxruntime C/C++ API headers.
#
# Usage: fetch_ort_headers.sh DEST_DIR
# Prints the include directory (containing onnxruntime_cxx_api.h) on the last line of stdout.
#
# Order: $ONNXRUNTIME_INCLUDE_DIR, /usr/include/onnxruntime, DEST_DIR (already fetched), else
# download Debian's libonnxruntime-dev with `apt-get download` from the mirror configured on this
# machine (read from /etc/apt/sources.list{,.d}), trying suites that ship it, with a private apt
# state (nothing is installed system-wide), and unpack only its headers into DEST_DIR.
set -euo pipefail

dest="${1:?usage: fetch_ort_headers.sh DEST_DIR}"
hdr=onnxruntime_cxx_api.h

have() { [ -f "$1/$hdr" ] && [ -f "$1/onnxruntime_c_api.h" ]; }

for d in "${ONNXRUNTIME_INCLUDE_DIR:-}" /usr/include/onnxruntime "$dest/include/onnxruntime"; do
  if [ -n "$d" ] && have "$d"; then echo "$d"; exit 0; fi
done

fail() {
  echo "onnxopt: cannot find the onnxruntime C/C++ API headers ($hdr)." >&2
  echo "  Set ONNXRUNTIME_INCLUDE_DIR to a directory holding them (e.g. from an onnxruntime" >&2
  echo "  release archive), install Debian's libonnxruntime-dev, or allow apt to reach a Debian" >&2
  echo "  mirror (tried: $*)." >&2
  exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "apt-get not available"
command -v dpkg-deb >/dev/null 2>&1 || fail "dpkg-deb not available"

# Collect Debian mirror URIs (main archive, not -security) from the configured apt sources.
mirrors=()
add_mirror() {
  local u="${1%/}"
  case "$u" in *security*|"") return ;; esac
  case "$u" in */debian|*/debian-*) ;; *) [[ "$u" == *debian* ]] || return ;; esac
  for m in "${mirrors[@]:-}"; do [ "$m" = "$u" ] && return; done
  mirrors+=("$u")
}
shopt -s nullglob
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] || continue
  while read -r typ rest; do
    [ "$typ" = "deb" ] || continue
    rest="${rest#\[*\] }"           # drop [options]
    add_mirror "${rest%% *}"
  done < <(grep -E '^[[:space:]]*deb[[:space:]]' "$f" || true)
done
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  while read -r u; do add_mirror "$u"; done < <(awk 'tolower($1)=="uris:"{for(i=2;i<=NF;i++) print $i}' "$f")
done
[ "${#mirrors[@]}" -gt 0 ] || fail "no Debian mirror configured in /etc/apt/sources.list{,.d}"

keyring=/usr/share/keyrings/debian-archive-keyring.gpg
opt_signed=""
[ -f "$keyring" ] && opt_signed="[signed-by=$keyring]"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts" "$work/dl"
tried=()
for suite in ${ONNXOPT_ORT_DEB_SUITES:-trixie sid forky}; do
  for m in "${mirrors[@]}"; do
    echo "deb $opt_signed $m $suite main" > "$work/sources.list"
    tried+=("$m $suite")
    aptopts=(-q -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
             -o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/parts"
             -o "APT::Sandbox::User=root" -o "Acquire::Retries=2" -o "APT::Get::List-Cleanup=0")
    echo "onnxopt: fetching libonnxruntime-dev headers from $m ($suite)" >&2
    if apt-get "${aptopts[@]}" update >&2 \
       && (cd "$work/dl" && apt-get "${aptopts[@]}" download libonnxruntime-dev >&2); then
      deb=("$work"/dl/libonnxruntime-dev_*.deb)
      if [ -f "${deb[0]}" ]; then
        dpkg-deb -x "${deb[0]}" "$work/x"
        src="$work/x/usr/include/onnxruntime"
        if have "$src"; then
          mkdir -p "$dest/include"
          rm -rf "$dest/include/onnxruntime"
          cp -r "$src" "$dest/include/onnxruntime"
          basename "${deb[0]}" > "$dest/include/onnxruntime/.source-package"
          echo "$dest/include/onnxruntime"
          exit 0
        fi
      fi
    fi
    rm -rf "$work/dl"/* "$work/x"
  done
done
fail "${tried[*]}"
