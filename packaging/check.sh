#!/usr/bin/env bash
# Checks the packaging: the systemd units pass `systemd-analyze verify`
# (pointed at the freshly built binaries) and both Debian packages build
# and hold the binary, the unit and the example config (and the
# coordinator's, lingua-ctl).
# Needs: systemd (systemd-analyze), cargo-deb (`cargo install cargo-deb`).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p lingua-agent -p lingua-coordinator
units=$(mktemp -d)
trap 'rm -rf "$units"' EXIT
for name in agent coordinator; do
  # verify checks that ExecStart exists: point it at the built binary.
  sed "s|/usr/bin/lingua-$name|$PWD/target/release/lingua-$name|" "packaging/lingua-$name.service" \
    > "$units/lingua-$name.service"
  systemd-analyze verify "$units/lingua-$name.service"
  echo "packaging: lingua-$name.service verified"
done

for name in agent coordinator; do
  deb=$(cargo deb --no-build -p "lingua-$name" | tail -n 1)
  echo "packaging: built $deb"
  contents=$(dpkg-deb -c "$deb")
  echo "$contents"
  for path in "./usr/bin/lingua-$name" "lingua-$name.service" "./etc/lingua/$name.toml"; do
    grep -q -- "$path" <<<"$contents" || { echo "packaging: $deb lacks $path" >&2; exit 1; }
  done
  # Not a pipe into grep -q: under pipefail, grep leaving early kills
  # dpkg-deb with SIGPIPE and fails the check at random.
  if [ "$name" = coordinator ]; then
    grep -q -- "./usr/bin/lingua-ctl" <<<"$contents" || { echo "packaging: $deb lacks lingua-ctl" >&2; exit 1; }
  fi
  info=$(dpkg-deb -I "$deb")
  grep -q "conffiles" <<<"$info" || { echo "packaging: $deb declares no conffiles" >&2; exit 1; }
done
