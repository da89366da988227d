#!/bin/sh
# debian_tool.sh COMMAND PACKAGE: make sure COMMAND is on PATH, installing Debian's PACKAGE
# (no recommends) when it is missing. Nothing happens when it is already there. Installing
# needs root; a package's service is not started where there is no init system.
set -eu
command="$1"
package="$2"
command -v "$command" >/dev/null 2>&1 && exit 0
command -v apt-get >/dev/null 2>&1 || {
  echo "make tools: $command is missing and this is not Debian; install it and put $command on PATH" >&2
  exit 1
}
[ "$(id -u)" = 0 ] || {
  echo "make tools: $command is missing; run as root, or: sudo apt-get install --no-install-recommends $package" >&2
  exit 1
}
echo "make tools: installing $command (Debian package $package)"
log=$(mktemp)
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package"; } >"$log" 2>&1; then
  cat "$log" >&2
  rm -f "$log"
  echo "make tools: apt-get install $package failed" >&2
  exit 1
fi
rm -f "$log"
command -v "$command" >/dev/null 2>&1 || {
  echo "make tools: $package installed but $command is not on PATH" >&2
  exit 1
}
